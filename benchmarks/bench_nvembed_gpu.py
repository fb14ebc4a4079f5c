"""NV-Embed-v2 at full size with random weights (no download): the backend's own batching path on a GPU.

Runs the engine (tokenise -> plan token-budgeted micro-batches -> forward) on (a) a kt_gen-like mix
(log-normal lengths, ~16 tokens mean) and (b) passages (~300 tokens), and prints real tokens/s (padding
excluded), padding efficiency, achieved TFLOP/s, and a dense bf16 matmul measured in the same run as the
ceiling. Three paths side by side on the same weights: the issue's reference (a plain loop over
length-sorted fixed-size padded batches), the engine padded, and the engine packed (Flash Attention
varlen on CUDA); the golden fixture's agreement is printed for each layout first. Without CUDA (or
with --tiny) it runs the tiny fixture shape on CPU as a smoke check.

    python benchmarks/bench_nvembed_gpu.py                      # full size on the GPU, bf16
    python benchmarks/bench_nvembed_gpu.py --tiny               # CPU smoke check
    python benchmarks/bench_nvembed_gpu.py --max-batch-tokens 32768
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from deployments.backends.nvembed import NVEmbedBackend, load_nvembed_tokenizer
from deployments.backends.nvembed_model import FULL_SIZE, NVEmbedConfig, random_nvembed
from deployments.batching import plan_micro_batches
from deployments.config import Batching
from deployments.embed_options import EmbedOptions
from deployments.engine import EmbedCall, EmbeddingEngine

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nvembed-tiny"


def words_from_vocab(tokenizer) -> list[str]:
    return [p[1:] for p in tokenizer.get_vocab() if p.startswith("▁") and p[1:].isalpha() and len(p) > 3]


def make_texts(words: list[str], n: int, mean_words: float, sigma: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, rng.lognormal(np.log(mean_words) - sigma**2 / 2, sigma, n).astype(int))
    return [" ".join(rng.choice(words, c)) for c in counts]


def flops_per_pass(config: NVEmbedConfig, lengths: list[int], packed: bool) -> float:
    """Matmul FLOPs of one forward pass (decoder, attention scores, latent block) as the GPU runs it:
    padded passes pay rows x longest tokens and rows x longest^2 scores, packed ones their real tokens."""
    t, la = config.text, config.latent
    d, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    longest = max(lengths)
    tokens = sum(lengths) if packed else len(lengths) * longest
    squares = sum(n * n for n in lengths) if packed else len(lengths) * longest * longest
    decoder = 2 * tokens * t.num_hidden_layers * (d * (2 * d + 2 * kv) + 3 * d * t.intermediate_size)
    scores = 4 * squares * d * t.num_hidden_layers
    inner = la.num_cross_heads * la.cross_dim_head
    latent = 2 * tokens * (2 * d * inner + 8 * d * d + 4 * d * d) + 4 * tokens * la.num_latents * inner
    return float(decoder + scores + latent)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fixture_agreement(device: torch.device) -> list[str]:
    """The golden fixture on this device: max |ours - published| per dtype and layout."""
    from deployments.backends.nvembed_model import build_nvembed, flash_varlen_supported

    cases = [c for c in json.loads((FIXTURE / "expected.json").read_text())["cases"] if "embeddings" in c]
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        model = build_nvembed(FIXTURE, device, dtype)
        for packed in (False, True):
            backend = NVEmbedBackend(model, load_nvembed_tokenizer(FIXTURE), packed=packed)
            worst = 0.0
            for case in cases:
                if case.get("reference_returns_nan"):
                    continue
                backend.max_seq_length = case["max_length"]
                got = backend.forward(backend.tokenize(case["texts"], case["instruction"]))
                worst = max(worst, float(np.abs(got - np.array(case["embeddings"])).max()))
            kernel = "flash varlen" if flash_varlen_supported(device, dtype) else "sdpa per text"
            layout = f"packed ({kernel})" if packed else "padded"
            lines.append(f"golden fixture on {device}, {dtype}, {layout}: max abs diff {worst:.2e}")
    return lines


def reference_loop(backend: NVEmbedBackend, texts: list[str], rows: int) -> list[list[int]]:
    """The issue's reference: a plain loop over length-sorted, fixed-size, padded batches.
    Returns the lengths in each batch it ran."""
    items = sorted(backend.tokenize(texts, ""), key=lambda it: it.length)
    backend.packed = False
    for i in range(0, len(items), rows):
        backend.forward(items[i : i + rows])
    return [[it.length for it in items[i : i + rows]] for i in range(0, len(items), rows)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny fixture shape on CPU (smoke check)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--forward-overhead-tokens", type=int, default=64)
    parser.add_argument("--short-texts", type=int, default=4096)
    parser.add_argument("--passages", type=int, default=512)
    parser.add_argument(
        "--reference-rows", type=int, default=64, help="batch size of the plain sorted-loop reference"
    )
    args = parser.parse_args()

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    raw = json.loads((FIXTURE / "config.json").read_text())
    if not tiny:
        for section, values in FULL_SIZE.items():
            raw[section] = {**copy.deepcopy(raw[section]), **values}
    config = NVEmbedConfig.from_dict(raw)
    tokenizer = load_nvembed_tokenizer(FIXTURE)
    model = random_nvembed(config, device, dtype)
    backend = NVEmbedBackend(model, tokenizer, max_seq_length=4096)
    batching = Batching(
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        forward_overhead_tokens=args.forward_overhead_tokens,
    )
    engine = EmbeddingEngine(backend, batching)
    words = words_from_vocab(tokenizer)
    n_short, n_pass = (256, 32) if tiny else (args.short_texts, args.passages)
    workloads = {
        "(a) kt_gen-like mix": make_texts(words, n_short, 15.0, 0.8, seed=1),
        "(b) passages": make_texts(words, n_pass, 290.0, 0.25, seed=2),
    }
    agreement = fixture_agreement(device)
    agreement.append(
        f"{'tiny' if tiny else 'full-size'} model, packed vs padded self-check (cosine >= 0.99): "
        f"{backend.packed_layout_agrees()}; "
        f"packed by default here: {backend.packed}"
    )
    ceiling = matmul_ceiling(device, dtype, 256 if tiny else 8192)
    params = sum(p.numel() for p in model.parameters()) / 1e9

    engine.run([EmbedCall(workloads["(a) kt_gen-like mix"][:64], EmbedOptions(normalize=True))])  # warm-up
    backend.packed = True
    engine.run([EmbedCall(workloads["(a) kt_gen-like mix"][:64], EmbedOptions(normalize=True))])
    rows = []
    for name, texts in workloads.items():
        lengths = [it.length for it in backend.tokenize(texts, "")]
        reference_speed = None
        for path in ("reference", "padded", "packed"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            if path == "reference":
                batches = reference_loop(backend, texts, args.reference_rows)
            else:
                backend.packed = path == "packed"
                engine.run([EmbedCall(texts, EmbedOptions(normalize=True))])
            sync(device)
            wall = time.perf_counter() - t0
            if path != "reference":  # the engine's own plan, recomputed outside the timed region
                plan = plan_micro_batches(
                    lengths,
                    batching.max_batch_tokens,
                    batching.max_batch_size,
                    batching.forward_overhead_tokens,
                    packed=backend.packed,
                )
                batches = [[lengths[i] for i in b] for b in plan.batches]
            real = sum(map(sum, batches))
            padded = real if path == "packed" else sum(len(b) * max(b) for b in batches)
            passes = len(batches)
            plan_flops = sum(flops_per_pass(config, b, packed=path == "packed") for b in batches)
            speed = real / wall
            reference_speed = reference_speed or speed
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            label = f"reference ({args.reference_rows} rows)" if path == "reference" else path
            rows.append(
                f"| {name} | {label} | {len(texts)} | {real / len(texts):.1f} | {speed:,.0f} | "
                f"{speed / reference_speed:.2f}x | {real / padded:.2f} | {passes} | "
                f"{plan_flops / wall / 1e12:.1f} | {peak:.1f} |"
            )

    label = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny shape, smoke check)"
    print("\n" + "\n".join(agreement))
    print(f"\nNV-Embed-v2 architecture, {params:.2f}B parameters, {dtype}, {label}")
    print(
        f"max_batch_tokens {batching.max_batch_tokens}, max_batch_size {batching.max_batch_size}; "
        f"dense matmul ceiling {ceiling:.1f} TFLOP/s\n"
    )
    print(
        "| workload | path | texts | mean tokens | real tokens/s | vs reference | padding eff. | passes "
        "| TFLOP/s | peak GiB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
