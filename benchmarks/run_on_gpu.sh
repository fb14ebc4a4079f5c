#!/usr/bin/env bash
# The GPU check for NV-Embed-v2, as one prepared script for a lent GPU machine (no Ray needed):
#   here:  ../shared/tools/gpu-carry-wheels.sh        # builds .whl/ (pydantic, pyyaml... for Python 3.12)
#   there: run with carry [".whl"]:  bash benchmarks/run_on_gpu.sh
# Prints the card, the golden fixture's agreement on the GPU (float32 and bf16, padded and packed), and the
# full-size benchmark (reference loop, engine padded, engine packed, side by side)
# at two batch budgets; copies of everything land in $OUT when it is set.
set -euo pipefail
OUT=${OUT:-/tmp/nvembed-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/bench_nvembed_gpu.py --max-batch-tokens 16384 2>&1 | tee "$OUT/bench-16k.txt"
python3 benchmarks/bench_nvembed_gpu.py --max-batch-tokens 32768 --max-batch-size 1024 --forward-overhead-tokens 256 2>&1 | tee "$OUT/bench-32k.txt"
