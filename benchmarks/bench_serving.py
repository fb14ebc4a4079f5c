"""Throughput and latency of the service against in-process sentence-transformers, side by side.

Starts its own Ray (private temp dir) and the app from a models config, then measures in one run:
in-process ``SentenceTransformer.encode(batch_size=64)``; the service via handle; the service via HTTP;
for (a) many concurrent clients sending one text each and (b) fewer clients sending 32 texts each, on a
kt_gen-like mix (60% entity names of 2-4 words, 40% descriptions of 8-120 words). Prints a table with
texts/s, p50/p99 latency, the ratio to in-process and the batcher's padding efficiency.

    python benchmarks/bench_serving.py                 # all-MiniLM-L6-v2 on CPU, 2000 texts
    python benchmarks/bench_serving.py --texts 4000 --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import kt_gen_mix, start_local_service, stop_local_service  # noqa: E402


def summarise(
    name: str, texts: int, wall: float, latencies: list[float], base: float | None, pad: str
) -> str:
    rate = texts / wall
    p50 = statistics.median(latencies) * 1e3 if latencies else float("nan")
    p99 = float(np.percentile(latencies, 99)) * 1e3 if latencies else float("nan")
    ratio = f"{rate / base:.2f}x" if base else "1.00x"
    return f"| {name} | {rate:8.1f} | {p50:8.1f} | {p99:8.1f} | {ratio} | {pad} |"


async def drive(send, texts: list[str], clients: int, per_request: int) -> tuple[float, list[float]]:
    """``clients`` tasks each sending ``per_request`` texts at a time until all texts are sent."""
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue = iter(chunks)
    latencies: list[float] = []

    async def client() -> None:
        for chunk in queue:
            t0 = time.perf_counter()
            await send(chunk)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - t0, latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--model", default=None, help="model name (default: the config's default_model)")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--single-clients", type=int, default=32)
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import aiohttp
    import torch
    from ray import serve
    from sentence_transformers import SentenceTransformer

    from deployments.config import load_models_config, resolve_model_source

    config = load_models_config(args.models_config)
    model = args.model or config.name_table()[config.default_model]
    entry = config.entry(model)
    texts = kt_gen_mix(args.texts)

    start_local_service(args.models_config, args.port)

    # In-process baseline, with the threads the service's replica gets.
    torch.set_num_threads(max(1, int(config.placements[entry.placement].num_cpus or 1)))
    st = SentenceTransformer(resolve_model_source(entry.source), device="cpu")
    st.max_seq_length = entry.max_seq_length
    st.encode(texts[:64], batch_size=64)
    t0 = time.perf_counter()
    st.encode(texts, batch_size=64)
    base = len(texts) / (time.perf_counter() - t0)
    del st

    url = f"http://127.0.0.1:{args.port}/v1/embeddings"
    rows = [f"| in-process encode(batch_size=64) | {base:8.1f} | - | - | 1.00x | - |"]

    async def run_all() -> None:
        # Handles are made inside the event loop: Serve's throughput-optimised mode requires it.
        handle = serve.get_app_handle("embeddings")
        stats = serve.get_deployment_handle(model, "embeddings").stats
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

            async def via_http(chunk: list[str]) -> None:
                async with session.post(url, json={"input": chunk, "model": model}) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")

            async def via_handle(chunk: list[str]) -> None:
                await handle.embed.remote(chunk, model=model)

            for sender, name in ((via_handle, "handle"), (via_http, "HTTP")):
                await drive(sender, texts[:64], 8, 8)  # warm-up
                for label, clients, per in (
                    (f"(a) {args.single_clients} clients x 1 text", args.single_clients, 1),
                    (
                        f"(b) {args.batch_clients} clients x {args.batch_size} texts",
                        args.batch_clients,
                        args.batch_size,
                    ),
                ):
                    before = await stats.remote()
                    wall, lat = await drive(sender, texts, clients, per)
                    after = await stats.remote()
                    real = after["real_tokens"] - before["real_tokens"]
                    padded = after["padded_tokens"] - before["padded_tokens"]
                    passes = after["forward_passes"] - before["forward_passes"]
                    pad = f"{real / padded:.2f} ({len(texts) / max(passes, 1):.1f} texts/pass)"
                    rows.append(summarise(f"{label} via {name}", len(texts), wall, lat, base, pad))

    asyncio.run(run_all())
    print(f"\nmodel {model} ({entry.source}), {len(texts)} kt_gen-like texts, {os.cpu_count()} CPUs\n")
    print("| run | texts/s | p50 ms | p99 ms | vs in-process | padding efficiency |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(rows))
    stop_local_service()


if __name__ == "__main__":
    main()
