"""The disk cache (``cache.disk_gb``): a pipeline run again, against the same run with no disk cache, and
Infinity's own disk cache (``--vector-disk-cache``) on the same texts.

A pipeline run is replayed over HTTP in kt_gen's shapes on two mixes (kt_gen-like texts and short entity
names): (a) 32 clients x 1 text, (b) 8 clients x 32 texts, each workload with texts of its own. Each server
runs three times, started afresh each time: ``off`` (no disk cache), ``cold`` (an empty store: every text
computed and written), ``warm`` (restarted on that store: a second run of the pipeline, answered from
disk). Ours: one Ray (private temp dir, HAProxy as ``make serve`` when installed), the app redeployed per
state (a new replica process), the in-memory cache off so the disk layer is measured alone. Then, with Ray
shut down, Infinity (``--infinity PATH``; it needs ``diskcache`` in its virtualenv) started per state with
its cache under a fresh ``INFINITY_HOME``. The sequence repeats ``--repeats`` times; medians are printed,
with our model's forward seconds, our store's hits, and the worst cosine of each warm run's vectors to the
same server's ``off`` run on a sample of each stream (the exact path is the server without the cache).

    python benchmarks/bench_disk_cache.py --infinity /tmp/inf/bin/infinity_emb    # all-MiniLM-L6-v2
    python benchmarks/bench_disk_cache.py --shape bge-large --texts 512           # a bge-large shape
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import INFINITY_BEST_CPU, client_connector, drive, http_sender  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_ingress_option,
    kt_gen_mix,
    short_mix,
    start_local_service,
    stats_deployment,
    stop_local_service,
    use_haproxy,
)

STATES = ("off", "cold", "warm")
SAMPLE = 64  # texts of each stream whose vectors are compared between states
WORKLOADS = (  # label, mix, clients, texts per request, stream seed
    ("kt_gen, (a) 32 x 1", kt_gen_mix, 32, 1, 7),
    ("kt_gen, (b) 8 x 32", kt_gen_mix, 8, 32, 8),
    ("names, (a) 32 x 1", short_mix, 32, 1, 9),
    ("names, (b) 8 x 32", short_mix, 8, 32, 10),
)


def write_config(base: Path, workdir: Path, state: str, store_dir: Path, shape_dir: str | None) -> str:
    """``base`` with the default model's memory cache off and its disk cache as ``state`` says; with a
    shape, that model (OpenVINO bf16, as the local default) in the default model's place."""
    data = yaml.safe_load(base.read_text())
    entry = next(e for e in data["models"] if e["name"] == data["default_model"])
    if shape_dir is not None:
        entry.update(source=shape_dir, max_seq_length=512, compile_cache_dir=str(workdir / "openvino-cache"))
    entry.pop("cache", None)
    if state != "off":
        entry["cache"] = {"disk_gb": 4, "disk_dir": str(store_dir)}
    path = workdir / f"models-{state}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


async def replay_all(url: str, model: str, streams: list[list[str]], stats=None) -> list[tuple]:
    """Each workload's stream in its shape: (texts/s, deltas of our counters, sample vectors) each."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession(connector=client_connector()) as session:
        send = http_sender(session, url, model)
        await drive(send, kt_gen_mix(64, seed=99), 8, 8)  # warm-up on other texts
        for (_, _, clients, per, _), stream in zip(WORKLOADS, streams, strict=True):
            before = await stats.remote() if stats else {}
            result = await drive(send, stream, clients, per)
            after = await stats.remote() if stats else {}
            sample = await send(stream[:SAMPLE])
            counters = ("forward_seconds", "forward_passes", "disk_cache_hits", "disk_cache_misses")
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in counters}
            out.append((result.rate, delta, sample))
        await asyncio.sleep(2)  # the last writes land before the server goes
    return out


def ours(args, workdir: Path, store_dir: Path, shape_dir: str | None, streams) -> dict[str, list]:
    from ray import serve

    from deployments.app import AppArgs, build_app
    from deployments.config import load_models_config

    base = Path(args.models_config)
    config = load_models_config(args.models_config)
    model = config.default_model
    stats_name = stats_deployment(config, model)
    first = write_config(base, workdir, "off", store_dir, shape_dir)
    url = start_local_service(first, args.port, haproxy=use_haproxy(args)) + "/v1/embeddings"
    results = {}
    try:
        for state in STATES:
            if state != "off":
                path = write_config(base, workdir, state, store_dir, shape_dir)
                serve.run(build_app(AppArgs(models_config=path)), name="embeddings", route_prefix="/")
            stats = serve.get_deployment_handle(stats_name, "embeddings").stats
            results[state] = asyncio.run(replay_all(url, model, streams, stats))
    finally:
        stop_local_service()
    return results


def infinity(args, model_dir: str, home: Path, streams) -> dict[str, list]:
    """Infinity on the same model folder (its own max_seq_length, the folder's), texts and shapes, per
    state (its cache under ``home``)."""
    results = {}
    for state in STATES:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
               "INFINITY_HOME": str(home)}  # fmt: skip
        flag = "--no-vector-disk-cache" if state == "off" else "--vector-disk-cache"
        command = [args.infinity, "v2", "--model-id", model_dir, "--engine", "torch", "--device", "cpu",
                   "--port", str(args.infinity_port), flag,
                   *shlex.split(args.infinity_args)]  # fmt: skip
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{args.infinity_port}"
        try:
            name = wait_for_infinity(base, server)
            results[state] = asyncio.run(replay_all(f"{base}/embeddings", name, streams))
        finally:
            server.terminate()
            server.wait(60)
    return results


def wait_for_infinity(base: str, server: subprocess.Popen) -> str:
    import httpx

    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"Infinity exited ({server.returncode}) before it answered")
        try:
            return httpx.get(f"{base}/models", timeout=2).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            time.sleep(0.5)
    raise RuntimeError("Infinity did not start within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--shape", choices=["bge-large", "bge-tiny"], help="a random-weight model shape")
    parser.add_argument("--texts", type=int, default=1024, help="texts a workload")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--work", default=None, help="folder for a shape and the stores (default: temp)")
    parser.add_argument("--infinity", default=None, help="path of infinity_emb (default: not measured)")
    parser.add_argument("--infinity-port", type=int, default=7997)
    parser.add_argument("--infinity-args", default=INFINITY_BEST_CPU)
    add_ingress_option(parser)
    args = parser.parse_args()

    from deployments.config import load_models_config, resolve_model_source
    from deployments.engine.backends.fidelity import worst_cosine

    workdir = Path(args.work or tempfile.mkdtemp(prefix="bench-disk-cache-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape_dir = None
    if args.shape:
        from benchmarks.model_shapes import build_shape

        shape_dir = build_shape(args.shape, workdir / args.shape)
    config = load_models_config(args.models_config)
    entry = config.entry(config.default_model)
    model_dir = shape_dir or resolve_model_source(entry.source, Path(args.models_config).parent)
    if shape_dir and args.infinity:  # Infinity's sentence-transformers reads only the older layout
        from benchmarks.model_shapes import legacy_copy

        model_dir = legacy_copy(shape_dir, workdir / f"{args.shape}-legacy")
    streams = [mix(args.texts, seed=seed) for _, mix, _, _, seed in WORKLOADS]
    servers = ["ours"] + (["Infinity"] if args.infinity else [])
    runs: dict[str, list[dict[str, list]]] = {s: [] for s in servers}
    for repeat in range(args.repeats):  # fresh stores each repeat; ours, then Infinity with Ray down
        runs["ours"].append(ours(args, workdir, workdir / f"store-{repeat}", shape_dir, streams))
        if args.infinity:
            home = workdir / f"infinity-home-{repeat}"
            runs["Infinity"].append(infinity(args, model_dir, home, streams))

    ingress = "HAProxy" if use_haproxy(args) else "Serve proxy"
    name = f"{args.shape} shape (random weights)" if args.shape else entry.name
    print(f"\n{name}; ours via {ingress}; {args.texts} texts a workload; medians of {args.repeats} runs.")
    print("off: no disk cache; cold: an empty store (computed and written); warm: restarted on that store")
    print("(a second pipeline run). Worst cosine: warm vectors to the same server's off run, on a sample.")
    if args.infinity:
        print(
            f"Infinity: infinity_emb v2 --engine torch --device cpu {args.infinity_args} --vector-disk-cache"
        )
    print("\n| workload | server | texts/s off | cold | warm | cold / off | warm / off "
          "| model s off / cold / warm | warm hits / misses | worst cosine |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for w, (label, *_) in enumerate(WORKLOADS):
        for server in servers:
            per_state = {s: [run[s][w] for run in runs[server]] for s in STATES}
            rate = {s: statistics.median(r[0] for r in per_state[s]) for s in STATES}
            pairs = zip(per_state["warm"], per_state["off"], strict=True)
            worst = min(worst_cosine(warm[2], off[2]) for warm, off in pairs)
            if server == "ours":
                model_s = " / ".join(
                    f"{statistics.median(r[1]['forward_seconds'] for r in per_state[s]):.1f}" for s in STATES
                )
                counts = [r[1] for r in per_state["warm"]]
                hits = min(c["disk_cache_hits"] for c in counts)
                hits = f"{hits} / {max(c['disk_cache_misses'] for c in counts)}"
            else:
                model_s, hits = "-", "-"
            print(
                f"| {label} | {server} | {rate['off']:.1f} | {rate['cold']:.1f} | {rate['warm']:.1f} "
                f"| {rate['cold'] / rate['off']:.2f}x | {rate['warm'] / rate['off']:.2f}x | {model_s} "
                f"| {hits} | {worst:.6f} |"
            )
    if args.infinity:
        ratios = []
        for w, (label, *_) in enumerate(WORKLOADS):
            ours_warm = statistics.median(run["warm"][w][0] for run in runs["ours"])
            peer_warm = statistics.median(run["warm"][w][0] for run in runs["Infinity"])
            ratios.append(f"{label}: {ours_warm / peer_warm:.2f}x")
        print("\nwarm, ours / Infinity: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
