"""Fairness and abandoned work, over HTTP, in one run: what the replica's scheduler is for.

Starts its own Ray (private temp dir) and the app from a models config, then measures:

(a) one bulk request of 2048 kt_gen-like inputs, alone (before and after (b), to show the machine's drift);
(b) the same bulk request while one client sends single texts one after another: the single texts'
    latency (p50, p99) and the bulk request's throughput against (a);
(c) 200 clients send 16 texts each and hang up after 1.5 s; then single texts one after another: how long
    after the hang-up a request is answered in under 1 s again, how many inputs were computed for callers
    that had left, and how many queued inputs were dropped.

    python benchmarks/bench_scheduling.py    # all-MiniLM-L6-v2 on CPU (configs/models.local.yaml)
    python benchmarks/bench_scheduling.py --bulk 4096 --port 8124
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

from benchmarks.common import (  # noqa: E402
    config_with_cache,
    kt_gen_mix,
    start_local_service,
    stats_deployment,
    stop_local_service,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--bulk", type=int, default=2048)
    parser.add_argument("--hangup-clients", type=int, default=200)
    parser.add_argument("--hangup-texts", type=int, default=16)
    parser.add_argument("--hangup-after-s", type=float, default=1.5)
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    from ray import serve

    from deployments.config import load_models_config

    config = load_models_config(args.models_config)
    model = config.name_table()[config.default_model]
    bulk = kt_gen_mix(args.bulk, seed=1)
    singles = kt_gen_mix(400, seed=2)
    singles = [t for t in singles if len(t.split()) <= 4]  # entity names: what retrievers send one by one

    base = start_local_service(config_with_cache(args.models_config, None), args.port)  # every text computed
    stats = serve.get_deployment_handle(stats_deployment(config, model), "embeddings").stats
    rows: list[str] = []

    async def post(client: httpx.AsyncClient, texts, timeout: float = 600) -> float:
        t0 = time.perf_counter()
        resp = await client.post("/v1/embeddings", json={"input": texts, "model": model}, timeout=timeout)
        resp.raise_for_status()
        data = resp.json()["data"]
        np.asarray([d["embedding"] for d in data], dtype=np.float32)  # decoded as a client would
        return time.perf_counter() - t0

    async def bulk_alone(client) -> float:
        return await post(client, bulk)

    async def bulk_with_singles(client) -> tuple[float, list[float]]:
        latencies: list[float] = []
        task = asyncio.ensure_future(post(client, bulk))
        await asyncio.sleep(0.2)
        i = 0
        while not task.done():
            latencies.append(await post(client, singles[i % len(singles)]))
            i += 1
        return await task, latencies

    async def hang_ups(client) -> dict[str, float]:
        async def leaver(i: int) -> None:
            texts = kt_gen_mix(args.hangup_texts, seed=1000 + i)
            try:
                await client.post("/v1/embeddings", json={"input": texts}, timeout=args.hangup_after_s)
            except httpx.TimeoutException:
                pass

        before = await stats.remote()
        await asyncio.gather(*(leaver(i) for i in range(args.hangup_clients)))
        hung_up = time.perf_counter()
        at_hangup = await stats.remote()
        quick_after = float("nan")
        sent = 0
        while time.perf_counter() - hung_up < 60:
            latency = await post(client, singles[sent % len(singles)])
            sent += 1
            if latency < 1.0:
                quick_after = time.perf_counter() - hung_up
                break
        await asyncio.sleep(1.0)
        after = await stats.remote()

        def delta(key: str, start: dict, end: dict) -> float:  # nan where an older engine lacks the key
            return end.get(key, np.nan) - start.get(key, np.nan)

        rows_key = "rows" if "rows" in after else "inputs"
        return {
            "quick_after_s": quick_after,
            "rows_after_hangup": delta(rows_key, at_hangup, after) - sent,
            "abandoned": delta("abandoned_inputs", before, after),
            "dropped": delta("dropped_inputs", before, after),
            "computed_before_hangup": delta(rows_key, before, at_hangup),
        }

    async def run_all() -> None:
        limits = httpx.Limits(max_connections=args.hangup_clients + 16)
        async with httpx.AsyncClient(base_url=base, limits=limits) as client:
            await post(client, bulk[:256])  # warm-up
            a1 = await bulk_alone(client)
            b_wall, lat = await bulk_with_singles(client)
            a2 = await bulk_alone(client)
            a = (a1 + a2) / 2
            rows.append(
                f"| (a) bulk {args.bulk} alone | {args.bulk / a:.1f} inputs/s ({a1:.1f} s, {a2:.1f} s) | - |"
            )
            if not lat:
                raise SystemExit("the bulk request was answered before any single text was sent")
            p50 = statistics.median(lat) * 1e3
            p99 = float(np.percentile(lat, 99)) * 1e3
            rows.append(
                f"| (b) bulk + single texts one after another | {args.bulk / b_wall:.1f} inputs/s "
                f"({b_wall:.1f} s) = {a / b_wall:.2f}x of (a) | {len(lat)} singles: p50 {p50:.0f} ms, "
                f"p99 {p99:.0f} ms, max {max(lat) * 1e3:.0f} ms |"
            )
            c = await hang_ups(client)
            rows.append(
                f"| (c) {args.hangup_clients} x {args.hangup_texts} texts, hang up after "
                f"{args.hangup_after_s} s | quick again {c['quick_after_s']:.2f} s after the hang-up | "
                f"computed for callers gone: {c['abandoned']:.0f} in passes they left during, "
                f"{c['rows_after_hangup']:.0f} after; dropped {c['dropped']:.0f} queued; "
                f"{c['computed_before_hangup']:.0f} computed before |"
            )
        final = await stats.remote()
        efficiency = final["real_tokens"] / max(final["padded_tokens"], 1)
        rows.append(
            f"| replica totals | {final['forward_passes']} passes | padding efficiency {efficiency:.3f} |"
        )

    asyncio.run(run_all())
    print(f"\nmodel {model}, bulk of {args.bulk} kt_gen-like inputs, {os.cpu_count()} CPUs\n")
    print("| scenario | throughput | latency / work |")
    print("| --- | --- | --- |")
    print("\n".join(rows))
    stop_local_service()


if __name__ == "__main__":
    main()
