"""The service against in-process sentence-transformers and against Infinity, side by side, in one run.

Order, so that no measurement shares the CPUs with an idle server:
1. in-process ``SentenceTransformer.encode(batch_size=64)`` and single-text ``encode`` latency, no Ray;
2. Infinity (``--infinity``, its own virtualenv) on the same texts and concurrency, then stopped;
3. our service (its own Ray, private temp dir; through HAProxy as ``make serve`` when haproxy is
   installed): via the Python handle and via HTTP;
4. Ray shut down, the in-process baseline again.

Workloads, on each text mix (``--mixes``; ``kt_gen``: 60% entity names of 2-4 words, 40% descriptions of
8-120 words; ``short``: capitalised names of 2-4 words and descriptions of 20-30 words):
(a) many concurrent clients sending one text each; (b) fewer clients sending 32 texts each; (c) one
client sending single entity names one after another (latency added over in-process single-text encode).
Every HTTP response is decoded into a float32 array, as a client would.

Fair to the peer: every server is warmed up the same way before anything is timed (a few requests of
each workload's shape), then each workload runs ``--repeats`` times (a, b, c, a, b, c, ...). The table
gives the median texts/s with the spread (min-max) of the runs, p50/p99 over all runs' requests, the
ratios of the medians to the clean in-process baseline and to Infinity, our batcher's padding efficiency,
and the load generator's own CPU use (this process, in % of one core): on 2 cores it competes with the
server it measures.

    python benchmarks/bench_serving.py --infinity /path/to/venv/bin/infinity_emb
    python benchmarks/bench_serving.py --infinity-args="--batch-size 16"   # "=": the value starts with --
    python benchmarks/bench_serving.py --texts 4000 --port 8123 --skip-infinity
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MIXES,
    add_ingress_option,
    config_with_cache,
    start_local_service,
    stats_deployment,
    stop_local_service,
    use_haproxy,
    with_shape,
)

Send = Callable[[list[str]], Awaitable[np.ndarray]]
# Infinity's fastest CPU setting of those tried with 0.0.78 (docs/performance.md): the peer at its best.
INFINITY_BEST_CPU = "--dtype bfloat16"


def cpu_seconds() -> float:
    """CPU time of this process (the load generator; with the handle, also the Ray driver) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Result:
    texts: int
    wall: float
    latencies: list[float] = field(default_factory=list)
    padding: str = "-"
    cpu: float = 0.0  # the load generator's CPU seconds during the run

    @property
    def rate(self) -> float:
        return self.texts / self.wall


@dataclass
class Runs:
    """The repeats of one workload on one server: medians, spread, and latencies over every request."""

    runs: list[Result]

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def spread(self) -> str:
        rates = [r.rate for r in self.runs]
        return f"{min(rates):.1f}-{max(rates):.1f}"

    @property
    def load_cpu(self) -> float:
        """The load generator's CPU use, median over the runs, in % of one core."""
        return statistics.median(100 * r.cpu / r.wall for r in self.runs)

    @property
    def padding(self) -> str:
        return self.runs[len(self.runs) // 2].padding

    def pct(self, q: float) -> float:
        latencies = [t for r in self.runs for t in r.latencies]
        return float(np.percentile(latencies, q)) * 1e3 if latencies else float("nan")


async def drive(send: Send, texts: list[str], clients: int, per_request: int) -> Result:
    """``clients`` tasks each sending ``per_request`` texts at a time until all texts are sent."""
    chunks = iter([texts[i : i + per_request] for i in range(0, len(texts), per_request)])
    latencies: list[float] = []

    async def client() -> None:
        for chunk in chunks:
            t0 = time.perf_counter()
            vectors = await send(chunk)
            latencies.append(time.perf_counter() - t0)
            if vectors.shape[0] != len(chunk):
                raise RuntimeError(f"{vectors.shape[0]} vectors for {len(chunk)} texts")

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Result(len(texts), time.perf_counter() - t0, latencies, cpu=cpu_seconds() - cpu0)


def in_process(source: str, max_seq_length: int, threads: int, texts: list[str], singles: list[str]):
    """texts/s of ``encode(batch_size=64)`` and single-text ``encode`` latencies (s), nothing else running."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    st = SentenceTransformer(source, device="cpu")
    st.max_seq_length = max_seq_length
    st.encode(texts[:64], batch_size=64)
    t0 = time.perf_counter()
    st.encode(texts, batch_size=64)
    rate = len(texts) / (time.perf_counter() - t0)
    latencies = []
    for text in singles:
        t0 = time.perf_counter()
        st.encode([text])
        latencies.append(time.perf_counter() - t0)
    return rate, latencies


def client_connector():
    """Connections idle over 4 s are closed by the client, before uvicorn's 5 s keep-alive closes them."""
    import aiohttp

    return aiohttp.TCPConnector(limit=256, keepalive_timeout=4)


def http_sender(session, url: str, model: str, headers: dict[str, str] | None = None) -> Send:
    import aiohttp
    import orjson

    async def send(chunk: list[str]) -> np.ndarray:
        for attempt in (0, 1):  # a keep-alive connection the server closed as it was reused: resend once
            try:
                async with session.post(url, json={"input": chunk, "model": model}, headers=headers) as resp:
                    body = await resp.read()
                    break
            except aiohttp.ServerDisconnectedError:
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        return np.array([d["embedding"] for d in orjson.loads(body)["data"]], dtype=np.float32)

    return send


async def warm_up(send: Send, texts: list[str], singles: list[str], args) -> None:
    """The same warm-up for every server: a few requests of each workload's shape, none timed."""
    await drive(send, texts[: 2 * args.single_clients], args.single_clients, 1)
    await drive(send, texts[: 2 * args.batch_clients * args.batch_size], args.batch_clients, args.batch_size)
    await drive(send, singles[:10], 1, 1)


async def run_workloads(send: Send, texts, singles, args, stats=None) -> dict[str, Runs]:
    """(a), (b) and (c) through one sender, warmed up, ``args.repeats`` times in turn; padding from the
    model deployment's counters when given."""
    await warm_up(send, texts, singles, args)
    shapes = {"a": (texts, args.single_clients, 1), "b": (texts, args.batch_clients, args.batch_size),
              "c": (singles, 1, 1)}  # fmt: skip
    results: dict[str, list[Result]] = {key: [] for key in shapes}
    for _ in range(args.repeats):
        for key, (workload, clients, per) in shapes.items():
            before = await stats() if stats and key != "c" else None
            result = await drive(send, workload, clients, per)
            if before is not None:
                after = await stats()
                real = after["real_tokens"] - before["real_tokens"]
                padded = after["padded_tokens"] - before["padded_tokens"]
                passes = after["forward_passes"] - before["forward_passes"]
                busy = (after["forward_seconds"] - before["forward_seconds"]) / result.wall
                per_pass = len(workload) / max(passes, 1)
                result.padding = f"{real / padded:.2f} ({per_pass:.1f} texts/pass, model busy {busy:.0%})"
            results[key].append(result)
    return {key: Runs(runs) for key, runs in results.items()}


def infinity_results(args, model_dir: str, mixes) -> dict[str, dict[str, Runs]] | None:
    binary = args.infinity or shutil.which("infinity_emb")
    if args.skip_infinity or not binary:
        print("Infinity: not measured (pass --infinity PATH to its infinity_emb)", file=sys.stderr)
        return None
    import aiohttp

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    command = [binary, "v2", "--model-id", model_dir, "--engine", "torch", "--device", "cpu",
               "--port", str(args.infinity_port), "--no-vector-disk-cache",  # every text computed, as ours
               *shlex.split(args.infinity_args)]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.infinity_port}"
    try:

        async def measure() -> dict[str, dict[str, Runs]]:
            async with aiohttp.ClientSession(connector=client_connector()) as session:
                for _ in range(300):
                    try:
                        async with session.get(f"{base}/models") as resp:
                            model = (await resp.json())["data"][0]["id"]
                            break
                    except (aiohttp.ClientError, KeyError, IndexError):
                        await asyncio.sleep(0.5)
                else:
                    raise RuntimeError("Infinity did not start within 150 s")
                send = http_sender(session, f"{base}/embeddings", model)
                return {mix: await run_workloads(send, t, s, args) for mix, (t, s) in mixes.items()}

        return asyncio.run(measure())
    finally:
        server.terminate()
        server.wait(30)


def ours(args, model: str, mixes) -> dict[str, dict[str, dict[str, Runs]]]:
    import aiohttp
    from ray import serve

    # Without the embedding cache: the same texts go through handle and HTTP, and each must be computed
    # (benchmarks/bench_cache.py measures the cache).
    uncached = config_with_cache(args.models_config, None)
    url = start_local_service(uncached, args.port, args.haproxy) + "/v1/embeddings"
    print(f"service: {'HAProxy ingress' if args.haproxy else 'Serve proxy'}, stats from "
          f"{args.stats_deployment}", file=sys.stderr)  # fmt: skip
    try:

        async def measure() -> dict[str, dict[str, dict[str, Runs]]]:
            # Handles are made inside the event loop (Serve's throughput-optimised mode requires it).
            handle = serve.get_app_handle("embeddings")
            stats_handle = serve.get_deployment_handle(args.stats_deployment, "embeddings")

            async def stats() -> dict:
                return await stats_handle.stats.remote()

            async def via_handle(chunk: list[str]) -> np.ndarray:
                return await handle.embed.remote(chunk, model=model)

            async with aiohttp.ClientSession(connector=client_connector()) as session:
                via_http = http_sender(session, url, model)
                return {
                    mix: {
                        "handle": await run_workloads(via_handle, texts, singles, args, stats),
                        "HTTP": await run_workloads(via_http, texts, singles, args, stats),
                    }
                    for mix, (texts, singles) in mixes.items()
                }

        return asyncio.run(measure())
    finally:
        stop_local_service()


def table(args, base: tuple[float, float], single: tuple[float, float], peer, results) -> str:
    first, again = base
    lines = [
        "| run | texts/s, median (min-max) | p50 ms | p99 ms | vs in-process | vs Infinity "
        "| load generator CPU | padding (passes, busy) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| in-process encode(batch_size=64), before Ray | {first:.1f} | - | - | 1.00x | - | - | - |",
        f"| in-process encode(batch_size=64), after Ray | {again:.1f} | - | - | {again / first:.2f}x "
        "| - | - | - |",
        f"| (c) in-process single-text encode | - | {single[0]:.1f} | {single[1]:.1f} | - | - | - | - |",
    ]
    labels = {
        "a": f"(a) {args.single_clients} clients x 1 text",
        "b": f"(b) {args.batch_clients} clients x {args.batch_size} texts",
        "c": "(c) 1 client x 1 text, ms added over in-process",
    }
    runs = ([("Infinity", peer)] if peer else []) + list(results.items())
    for key in "abc":
        for name, res in runs:
            r = res[key]
            rate = f"{r.rate:.1f} ({r.spread})"
            if key == "c":  # latency added over in-process single-text encode
                lines.append(
                    f"| {labels[key]} via {name} | {rate} | {r.pct(50) - single[0]:+.1f} "
                    f"| {r.pct(99) - single[1]:+.1f} | - | - | {r.load_cpu:.0f}% | {r.padding} |"
                )
                continue
            vs_peer = f"{r.rate / peer[key].rate:.2f}x" if peer else "-"
            lines.append(
                f"| {labels[key]} via {name} | {rate} | {r.pct(50):.1f} | {r.pct(99):.1f} "
                f"| {r.rate / first:.2f}x | {vs_peer} | {r.load_cpu:.0f}% | {r.padding} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--model", default=None, help="model name (default: the config's default_model)")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--mixes", default="kt_gen,short", help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--singles", type=int, default=200, help="entity names sent one by one in (c)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--single-clients", type=int, default=32)
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--infinity", default=None, help="path of infinity_emb (default: on PATH)")
    parser.add_argument("--infinity-port", type=int, default=7997)
    parser.add_argument(
        "--infinity-args",
        default=INFINITY_BEST_CPU,
        help=f"more flags for infinity_emb v2, one string (default {INFINITY_BEST_CPU!r}: its fastest CPU "
        "setting measured, docs/performance.md)",
    )
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument("--skip-ours", action="store_true", help="only the baseline and Infinity")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each workload, in turn")
    parser.add_argument("--shape", default=None, help="the default model's weights: a random-weight model "
                        "of this shape (model_shapes.py), e.g. bge-large, for all three servers")  # fmt: skip
    add_ingress_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from deployments.config import load_models_config, resolve_model_source

    if args.shape:
        args.models_config = with_shape(config_with_cache(args.models_config, None), args.shape)
    config = load_models_config(args.models_config)
    model = args.model or config.name_table()[config.default_model]
    entry = config.entry(model)
    args.stats_deployment = stats_deployment(config, model)
    args.haproxy = use_haproxy(args)
    source = str(resolve_model_source(entry.source))
    threads = max(1, int(config.placements[entry.placement].num_cpus or 1))
    mixes = {}
    for mix in args.mixes.split(","):
        make = MIXES[mix]
        singles = [t for t in make(args.singles * 4, seed=1) if len(t.split()) <= 4][: args.singles]
        mixes[mix] = (make(args.texts), singles)

    baseline = {m: in_process(source, entry.max_seq_length, threads, t, s) for m, (t, s) in mixes.items()}
    peer_dir = source
    if args.shape:  # Infinity's sentence-transformers (3.4) reads only the older layout
        from benchmarks.model_shapes import legacy_copy

        peer_dir = legacy_copy(source, Path(source).parent / f"{args.shape}-legacy")
    peer = infinity_results(args, peer_dir, mixes)
    results = {mix: {} for mix in mixes} if args.skip_ours else ours(args, model, mixes)
    again = {m: in_process(source, entry.max_seq_length, threads, t, s) for m, (t, s) in mixes.items()}

    print(
        f"\nmodel {model}{f' with a {args.shape} shape (random weights)' if args.shape else ''} "
        f"({entry.source}, runtime {entry.runtime}, dtype {entry.dtype}), {args.texts} texts "
        f"a mix, {args.singles} single entity names, {os.cpu_count()} CPUs, {threads} threads everywhere, "
        f"{args.repeats} timed runs of each workload"
    )
    if peer:
        print(f"Infinity: infinity_emb v2 --engine torch --device cpu {args.infinity_args}".rstrip())
    for mix in mixes:
        first, single_latencies = baseline[mix]
        single = tuple(float(np.percentile(single_latencies, q)) * 1e3 for q in (50, 99))
        print(f"\nmix {mix}:\n")
        print(table(args, (first, again[mix][0]), single, peer[mix] if peer else None, results[mix]))


if __name__ == "__main__":
    main()
