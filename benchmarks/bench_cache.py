"""The embedding cache on a replayed kt_gen-like stream: the same service with the cache off and on.

The stream is what kt_gen sends while it builds a tree: 60% entity names (2-4 words), 40% descriptions
(8-120 words); 60% of the names recur (drawn from the names seen before, as entities recur across chunks),
descriptions never do. It is replayed over HTTP in kt_gen's shapes, (a) 32 clients x 1 text and (b) 8
clients x 32 texts, first against the app with no cache, then redeployed with ``cache: {max_mb}``, in
one run on one Ray (private temp dir). Prints texts/s, the ratio, and the cache's hits, misses and bytes.

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
    config_with_cache,
    kt_gen_mix,
    start_local_service,
    stop_local_service,
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
    args = parser.parse_args()

    from ray import serve

    from deployments.app import AppArgs, build_app
    from deployments.config import load_models_config

    config = load_models_config(args.models_config)
    model = config.name_table()[config.default_model]
    stream = recurring_stream(args.texts)
    names = sum(1 for t in stream if len(t.split()) <= 4)
    repeats = len(stream) - len(set(stream))
    configs = {"off": config_with_cache(args.models_config, None)}
    configs["on"] = config_with_cache(args.models_config, args.max_mb)
    url = start_local_service(configs["off"], args.port) + "/v1/embeddings"

    async def replay(clients: int, per: int) -> tuple[float, dict]:
        import aiohttp

        async with aiohttp.ClientSession(connector=client_connector()) as session:
            send = http_sender(session, url, model)
            await drive(send, kt_gen_mix(64, seed=99), 8, 8)  # warm-up on other texts
            rate = (await drive(send, stream, clients, per)).rate
        counts = await serve.get_app_handle("embeddings").cache_stats.remote()
        return rate, counts.get(model, {})

    results = {}
    try:
        for shape, clients, per in (("a", 32, 1), ("b", 8, 32)):
            for label in ("off", "on"):  # each run on a freshly deployed app: the cache starts empty
                app = build_app(AppArgs(models_config=configs[label]))
                serve.run(app, name="embeddings", route_prefix="/")
                results[shape, label] = asyncio.run(replay(clients, per))
    finally:
        stop_local_service()

    print(f"\nmodel {model}, {len(stream)} texts ({names} entity names), {repeats} repeats of an earlier")
    print(f"text, cache max_mb {args.max_mb:g}\n")
    print("| run | cache off texts/s | cache on texts/s | on / off | hits | misses | bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape, label in (("a", "(a) 32 clients x 1 text"), ("b", "(b) 8 clients x 32 texts")):
        (off, _), (on, counts) = results[shape, "off"], results[shape, "on"]
        print(
            f"| {label} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {counts.get('hits', 0)} "
            f"| {counts.get('misses', 0)} | {counts.get('bytes', 0)} |"
        )


if __name__ == "__main__":
    main()
