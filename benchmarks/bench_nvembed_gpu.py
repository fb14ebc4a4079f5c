"""NV-Embed-v2 at full size with random weights (no download): the backend's own batching path on a GPU.

Runs the engine (tokenise -> plan token-budgeted micro-batches -> forward) on (a) a kt_gen-like mix
(log-normal lengths, ~16 tokens mean) and (b) passages (~300 tokens), and prints real tokens/s (padding
excluded), padding efficiency, achieved TFLOP/s, and a dense bf16 matmul measured in the same run as the
ceiling. Three paths side by side on the same weights: the issue's reference (a plain loop over
length-sorted fixed-size padded batches), the engine padded, and the engine packed (Flash Attention
varlen on CUDA); the golden fixture's agreement is printed for each layout first. Then a retriever's
single queries during an index build (a bulk load of passages) through the engine's serving path, with
the next pass launched just before the running one ends (the default) or as it starts, and a query's
rows in a short pass of their own (the default) or riding along in a full one, and passes cut to
``--cut-ms`` while queries come in (``batching.interactive_pass_ms``), alternating
(``benchmarks/queries_during_bulk.py``): query p50/p90/max beside bulk tokens/s, the GPU's busy share, and
how well the launch point worked (the trades ``launch_timing.py`` and ``scheduler.plan_passes`` make).
Without CUDA (or with --tiny) it runs the tiny fixture shape on CPU as a smoke check.

Honest by construction: each path runs ``--repeats`` times, the paths alternating in order, and the table
gives the min and median; passes, real and padded tokens are the engine's own counters for the run (not
a plan recomputed beside it); a pass that fails (or ran out of memory and was split), and any row that is
missing or not finite, fails the whole run with its reason and a non-zero exit, never a fast number.

    python benchmarks/bench_nvembed_gpu.py                      # full size on the GPU, bf16
    python benchmarks/bench_nvembed_gpu.py --tiny               # CPU smoke check
    python benchmarks/bench_nvembed_gpu.py --max-batch-tokens 32768
    python benchmarks/bench_nvembed_gpu.py --tiny --inject-fault   # must fail: the check of the checks
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.nvembed_random import FULL_SIZE, random_nvembed  # noqa: E402
from benchmarks.queries_during_bulk import (  # noqa: E402
    TABLE_HEAD,
    BenchmarkFailed,
    Policy,
    check_vectors,
    compare,
    run_benchmark,
)
from deployments.config import Batching  # noqa: E402
from deployments.engine.backends.nvembed import NVEmbedBackend, load_nvembed_tokenizer  # noqa: E402
from deployments.engine.backends.nvembed_model import NVEmbedConfig  # noqa: E402
from deployments.engine.embedding_engine import EmbeddingEngine  # noqa: E402
from deployments.engine.launch_timing import LEAD_SHARE  # noqa: E402
from deployments.protocol.options import EmbedOptions, EmbedRequest  # noqa: E402

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
    from deployments.engine.backends.nvembed_model import build_nvembed, flash_varlen_supported

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


def reference_loop(backend: NVEmbedBackend, texts: list[str], rows: int) -> tuple[int, int, int, float]:
    """The issue's reference: a plain loop over length-sorted, fixed-size, padded batches, every output
    checked. Returns (passes, real tokens, padded tokens)."""
    items = sorted(backend.tokenize(texts, ""), key=lambda it: it.length)
    backend.packed = False
    real = padded = 0
    for i in range(0, len(items), rows):
        batch = items[i : i + rows]
        try:
            vectors = backend.forward(batch)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run, with its reason
            raise BenchmarkFailed(f"reference loop: a pass failed: {exc!r}") from exc
        check_vectors(vectors, len(batch), backend.dimension, "reference loop")
        real += sum(it.length for it in batch)
        padded += len(batch) * max(it.length for it in batch)
    return -(-len(items) // rows), real, padded, 0.0


def engine_run(engine: EmbeddingEngine, texts: list[str]) -> tuple[int, int, int, float]:
    """One call of every text through the engine, its answer checked; (passes, real, padded tokens, the
    device's own seconds in them: 0 where it does not time them) from the engine's own counters."""
    before = engine.stats()
    (result,) = engine.run([EmbedRequest(texts, EmbedOptions(normalize=True))])
    after = engine.stats()
    if isinstance(result, Exception):
        raise BenchmarkFailed(f"engine: the call failed: {result!r}")
    check_vectors(result.vectors, len(texts), engine.backend.dimension, "engine")
    if after["out_of_memory_passes"] > before["out_of_memory_passes"]:
        raise BenchmarkFailed("engine: a pass ran out of device memory and was run again split")
    delta = {
        k: after[k] - before[k] for k in ("forward_passes", "real_tokens", "padded_tokens", "device_seconds")
    }
    return delta["forward_passes"], delta["real_tokens"], delta["padded_tokens"], delta["device_seconds"]


def busy_or_dash(value: float, form: str = "{:.0%}") -> str:
    """A device-timed figure, or - where the device does not time its passes (CPU)."""
    return form.format(value) if value else "-"


def record_passes(backend: NVEmbedBackend) -> list[list[int]]:
    """The lengths of every forward pass the backend actually runs, appended as they run (for FLOPs). Every
    pass goes through ``_launch``: the scheduler's launches and the reference loop's ``forward`` alike."""
    launch, passes = backend._launch, []

    def recording(items):
        passes.append([it.length for it in items])
        return launch(items)

    backend._launch = recording
    return passes


def inject_fault(backend: NVEmbedBackend, after_passes: int) -> None:
    """From the ``after_passes``-th forward pass on, every pass fails (a device that went bad mid-run)."""
    launch, calls = backend._launch, [0]

    def failing(items):
        calls[0] += 1
        if calls[0] > after_passes:
            raise RuntimeError("injected fault (--inject-fault)")
        return launch(items)

    backend._launch = failing


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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path, alternating")
    parser.add_argument(
        "--inject-fault", action="store_true", help="every pass fails after the warm-up: the run must fail"
    )
    parser.add_argument(
        "--query-bulk-tokens",
        type=int,
        default=100_000,
        help="tokens of passages loaded while single queries are timed (0: skip that measurement)",
    )
    parser.add_argument(
        "--cut-ms",
        type=float,
        default=250.0,
        help="the query comparison's batching.interactive_pass_ms policy (passes cut while queries come in)",
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
    # The CPU smoke shape runs the GPU's pass loop too: the next pass launched before this one is read back.
    backend.asynchronous = True
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

    default_packed = backend.packed
    warm = workloads["(a) kt_gen-like mix"][:64]
    for packed in (False, True):
        backend.packed = packed
        engine_run(engine, warm)
    if args.inject_fault:
        inject_fault(backend, after_passes=2)
    ran = record_passes(backend)
    rows = []
    paths = ("reference", "padded", "packed")
    for name, texts in workloads.items():
        walls: dict[str, list[float]] = {path: [] for path in paths}
        counts: dict[str, tuple[int, int, int, float]] = {}
        busy: dict[str, list[float]] = {path: [] for path in paths}
        peaks: dict[
            str, float
        ] = {}  # GiB allocated to tensors at the peak, and reserved by torch's allocator
        reserved: dict[str, float] = {}
        flops: dict[str, float] = {}
        for repeat in range(args.repeats):
            for path in paths[repeat % 3 :] + paths[: repeat % 3]:  # each path first, middle and last
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                ran.clear()
                t0 = time.perf_counter()
                if path == "reference":
                    counts[path] = reference_loop(backend, texts, args.reference_rows)
                else:
                    backend.packed = path == "packed"
                    counts[path] = engine_run(engine, texts)
                sync(device)
                walls[path].append(time.perf_counter() - t0)
                busy[path].append(counts[path][3] / walls[path][-1])
                flops[path] = sum(flops_per_pass(config, lens, packed=path == "packed") for lens in ran)
                if len(ran) != counts[path][0]:
                    raise BenchmarkFailed(f"{path}: {len(ran)} passes ran, counted {counts[path][0]}")
                if device.type == "cuda":
                    peaks[path] = max(peaks.get(path, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                    reserved[path] = max(reserved.get(path, 0.0), torch.cuda.max_memory_reserved() / 2**30)
        reference_speed = counts["reference"][1] / statistics.median(walls["reference"])
        for path in paths:
            passes, real, padded, _ = counts[path]
            # The device's share of the wall time in the engine's passes (CUDA events), and what is left
            # per pass: the host planning, launching and reading back while the device waits.
            share = statistics.median(busy[path])
            gap_ms = (1 - share) * statistics.median(walls[path]) / passes * 1000
            on_gpu = f"{share:.0%} / {gap_ms:.1f}" if share else "-"
            best, median = real / min(walls[path]), real / statistics.median(walls[path])
            label = f"reference ({args.reference_rows} rows)" if path == "reference" else path
            tflops = flops[path] / statistics.median(walls[path]) / 1e12
            rows.append(
                f"| {name} | {label} | {len(texts)} | {real / len(texts):.1f} | {median:,.0f} | "
                f"{best:,.0f} | {median / reference_speed:.2f}x | {real / padded:.2f} | {passes} | "
                f"{tflops:.1f} | {f'{peaks[path]:.1f} / {reserved[path]:.1f}' if path in peaks else '-'} | "
                f"{on_gpu} |"
            )

    query_rows = []
    if args.query_bulk_tokens > 0:  # a retriever's queries while an index is built, four policies
        passages = workloads["(b) passages"]
        per_passage = sum(it.length for it in backend.tokenize(passages, "")) / len(passages)
        n_bulk = 64 if tiny else max(len(passages), round(args.query_bulk_tokens / per_passage))
        bulk = (passages * (n_bulk // len(passages) + 1))[:n_bulk]
        queries = make_texts(words, 64, 6.0, 0.5, seed=4)
        interval = 0.005 if tiny else 0.05
        policies = {
            Policy(): "launched just before the running one ends, a query's pass apart (the default)",
            Policy(just_in_time=False): "launched as the running one starts, apart",
            Policy(small_calls_apart=False): "just before the end, a query rides along in a full pass",
            Policy(interactive_pass_ms=args.cut_ms): f"the default, passes cut to {args.cut_ms:.0f} ms "
            "while queries come in",
        }
        backend.packed = default_packed  # as it serves
        query_rows = compare(backend, batching, bulk, queries, policies, interval, device.type == "cuda")

    label = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny shape, smoke check)"
    print("\n" + "\n".join(agreement))
    print(f"\nNV-Embed-v2 architecture, {params:.2f}B parameters, {dtype}, {label}")
    print(
        f"max_batch_tokens {batching.max_batch_tokens}, max_batch_size {batching.max_batch_size}; "
        f"dense matmul ceiling {ceiling:.1f} TFLOP/s\n"
    )
    print(
        f"| workload | path | texts | mean tokens | real tokens/s, median of {args.repeats} | best | "
        "vs reference (medians) | padding eff. | passes (engine's own) | TFLOP/s (median) | "
        "peak GiB allocated / reserved | "
        "GPU busy / idle ms per pass |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    if query_rows:
        print(
            f"\nA retriever's queries during an index build: {len(bulk)} passages "
            f"(~{round(per_passage * len(bulk)):,} tokens) sent at once as requests of 64, one short query "
            f"at a time {interval * 1000:.0f} ms after the last answer; the engine's serving path; "
            "2 runs of each policy, alternating\n"
        )
        print(TABLE_HEAD)
        print("\n".join(query_rows))
        print(
            "\n(launched after the pass before ended: the device idled until the host launched it, the "
            "estimate having come late; pass time vs estimate: the device's time over the estimate made "
            f"before the pass, less 1, which the launch lead ({LEAD_SHARE:.0%} of a pass) must cover)"
        )
    print(
        "\nAnchors (an H200, torch 2.11, this shape in bf16, a plain loop over length-sorted batches, no "
        "serving layer; ../shared/NOTES.md): short texts 20.9k tokens/s, passages 30.3k tokens/s; "
        "targets for the engine: >= 25k and >= 32k."
    )


if __name__ == "__main__":
    run_benchmark(main)
