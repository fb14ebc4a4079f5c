"""The embedding cache on a replayed kt_gen-like stream: the same service with the cache off and on.

The stream is what kt_gen sends while it builds a tree: 60% entity names (2-4 words), 40% descriptions
(8-120 words); 60% of the names recur (drawn from the names seen before, as entities recur across chunks),
descriptions never do. It is replayed over HTTP in kt_gen's shapes, (a) 32 clients x 1 text and (b) 8
clients x 32 texts, and (c) a names-only stream (kt_gen's entity embedding and the fork's dedup embed names
alone), each first against the app with no cache, then redeployed with ``cache: {max_mb}``, in one run on
one Ray (private temp dir, HAProxy as ``make serve`` when installed). Prints texts/s, p50 latency, the
model's forward seconds and the cache's hits and misses.

    python benchmarks/bench_cache.py                   # all-MiniLM-L6-v2 on CPU, 2000 texts
    python benchmarks/bench_cache.py --texts 4000 --max-mb 64
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import client_connector, drive, http_sender  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_ingress_option,
    config_with_cache,
    kt_gen_mix,
    start_local_service,
    stats_deployment,
    stop_local_service,
    use_haproxy,
)


def recurring_stream(n: int, recur: float = 0.6, seed: int = 0) -> list[str]:
    """kt_gen_mix's texts, where a name recurs with probability ``recur`` (one of the names seen so far)."""
    rng = random.Random(seed)
    fresh = iter(kt_gen_mix(2 * n, seed=seed))
    names: list[str] = []
    stream = []
    while len(stream) < n:
        text = next(fresh)
        if len(text.split()) <= 4:  # an entity name
            if names and rng.random() < recur:
                text = rng.choice(names)
            else:
                names.append(text)
        stream.append(text)
    return stream


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--max-mb", type=float, default=64)
    parser.add_argument("--port", type=int, default=8123)
    add_ingress_option(parser)
    args = parser.parse_args()

    from ray import serve

    from deployments.app import AppArgs, build_app
    from deployments.config import load_models_config

    config = load_models_config(args.models_config)
    model = config.name_table()[config.default_model]
    stats_name = stats_deployment(config, model)
    mixed = recurring_stream(args.texts)
    names = [t for t in recurring_stream(3 * args.texts, seed=1) if len(t.split()) <= 4][: args.texts]
    streams = {"mixed": mixed, "names": names}
    configs = {"off": config_with_cache(args.models_config, None)}
    configs["on"] = config_with_cache(args.models_config, args.max_mb)
    lean = use_haproxy(args)
    url = start_local_service(configs["off"], args.port, haproxy=lean) + "/v1/embeddings"

    async def replay(stream: list[str], clients: int, per: int) -> tuple[float, float, float, dict]:
        import aiohttp

        stats = serve.get_deployment_handle(stats_name, "embeddings").stats
        async with aiohttp.ClientSession(connector=client_connector()) as session:
            send = http_sender(session, url, model)
            await drive(send, kt_gen_mix(64, seed=99), 8, 8)  # warm-up on other texts
            before = await stats.remote()
            result = await drive(send, stream, clients, per)
            after = await stats.remote()
        counts = await serve.get_app_handle("embeddings").cache_stats.remote()
        forward = after["forward_seconds"] - before["forward_seconds"]
        return result.rate, result.pct(50), forward, counts.get(model, {})

    workloads = (
        ("(a) mixed stream, 32 clients x 1 text", "mixed", 32, 1),
        ("(b) mixed stream, 8 clients x 32 texts", "mixed", 8, 32),
        ("(c) entity names only, 8 clients x 32 names", "names", 8, 32),
    )
    results = {}
    try:
        for label, stream, clients, per in workloads:
            for state in ("off", "on"):  # each run on a freshly deployed app: the cache starts empty
                serve.run(
                    build_app(AppArgs(models_config=configs[state])), name="embeddings", route_prefix="/"
                )
                results[label, state] = asyncio.run(replay(streams[stream], clients, per))
    finally:
        stop_local_service()

    def repeats(stream: list[str]) -> str:
        return f"{len(stream) - len(set(stream))} of {len(stream)}"

    ingress = "HAProxy" if lean else "Serve proxy"
    print(f"\nmodel {model}, {ingress}, cache max_mb {args.max_mb:g}; repeats of an")
    print(f"earlier text: mixed {repeats(mixed)} (60% names, 60% of names recur), names {repeats(names)}\n")
    print("| run | texts/s off | texts/s on | on / off | p50 ms off / on | model s off / on | hits | miss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, *_ in workloads:
        off, p50_off, busy_off, _ = results[label, "off"]
        on, p50_on, busy_on, counts = results[label, "on"]
        print(
            f"| {label} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {p50_off:.0f} / {p50_on:.0f} "
            f"| {busy_off:.1f} / {busy_on:.1f} | {counts.get('hits', 0)} | {counts.get('misses', 0)} |"
        )


if __name__ == "__main__":
    main()
