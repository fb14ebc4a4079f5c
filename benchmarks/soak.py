"""A soak: fresh texts for a while from many clients, and what the replicas' memory does meanwhile.

Starts a private service as ``make serve`` does (HAProxy when installed, jemalloc when installed unless
``--allocator system``, the local models config with its cache on: every text is new, so every lookup
misses and the cache fills as it would), then ``--clients`` closed-loop clients send requests of 1, 8 or
32 never-repeating kt_gen-like texts (in turn) until ``--minutes`` or ``--texts`` is reached. Every
``--sample-s`` seconds it samples the RSS of every Serve replica process. It reports, per replica, RSS
after the warm-up (``--warmup-minutes``, or ``--warmup-texts``), at the end and its growth in between,
plus errors and latency percentiles.

    python benchmarks/soak.py --minutes 10 --no-cache                    # docs/operations.md's table
    python benchmarks/soak.py --minutes 10 --no-cache --allocator system # the same on glibc malloc
    python benchmarks/soak.py --minutes 10                   # cache on: it grows towards its max_mb
    python benchmarks/soak.py --minutes 10 --disk-gb 1       # the disk cache alone: every text written
    python benchmarks/soak.py --texts 8000 --warmup-texts 2000   # what the suite runs
    python benchmarks/soak.py --minutes 10 --no-cache --shape bge-large --clients 8  # a 335M model
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    add_ingress_option,
    start_local_service,
    stop_local_service,
    use_haproxy,
    vocabulary,
    with_shape,
)  # noqa: E402, E501

SIZES = (1, 8, 32)


def replica_rss_mb(field: str = "VmRSS") -> dict[str, float]:
    """RSS (MB) of every Serve replica process on this machine, by its process title; ``field="VmHWM"``:
    the most each has held since it started (its load included, which the samples miss)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::ServeReplica:"):
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":"))
        out[f"{title.removeprefix('ray::ServeReplica:')} (pid {entry.name})"] = kb / 1024
    return out


def fresh_texts(seed: int):
    """Never-repeating kt_gen-like texts: names (2-4 words) and descriptions (8-120 words), numbered."""
    vocab = vocabulary()
    rng = random.Random(seed)
    for n in itertools.count():
        k = rng.randint(2, 4) if rng.random() < 0.6 else rng.randint(8, 120)
        yield f"{n} " + " ".join(rng.choice(vocab) for _ in range(k))


@dataclass
class SoakResult:
    texts: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    samples: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)  # (s, texts, rss)
    warm_at: tuple[float, int] | None = None  # (s, texts) when the warm-up ended
    seconds: float = 0.0
    allocator: str = "unknown"  # what the replica itself reports (/v1/models)
    peaks: dict[str, float] = field(default_factory=dict)  # the most RSS each replica held, load included

    def growth(self) -> dict[str, tuple[float, float, float]]:
        """Per replica: (RSS at the end of the warm-up, RSS at the end, max RSS after the warm-up)."""
        warm_t = self.warm_at[0] if self.warm_at else 0.0
        after = [rss for t, _, rss in self.samples if t >= warm_t]
        if not after:
            return {}
        first, last = after[0], after[-1]
        return {
            name: (first[name], last[name], max(s.get(name, 0.0) for s in after))
            for name in first
            if name in last
        }


async def soak(url: str, clients: int, deadline_s: float, max_texts: int, warmup_s: float,
               warmup_texts: int, sample_s: float) -> SoakResult:  # fmt: skip
    import aiohttp
    import orjson

    result = SoakResult()
    texts = fresh_texts(seed=int(time.time()))
    started = time.perf_counter()

    def done() -> bool:
        return time.perf_counter() - started >= deadline_s or result.texts >= max_texts

    async def client(i: int, session) -> None:
        for size in itertools.cycle(SIZES[i % len(SIZES) :] + SIZES[: i % len(SIZES)]):
            if done():
                return
            batch = [next(texts) for _ in range(size)]
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/embeddings", json={"input": batch}) as resp:
                    body = await resp.read()
                if resp.status != 200:
                    result.errors.append(f"HTTP {resp.status}: {body[:200]!r}")
                elif len(orjson.loads(body)["data"]) != size:
                    result.errors.append(f"{size} texts sent, another count answered")
            except aiohttp.ClientError as exc:
                result.errors.append(repr(exc))
            result.latencies.append(time.perf_counter() - t0)
            result.requests += 1
            result.texts += size

    async def sampler() -> None:
        while not done():
            now = time.perf_counter() - started
            if result.warm_at is None and (now >= warmup_s or result.texts >= warmup_texts):
                result.warm_at = (now, result.texts)
            result.samples.append((now, result.texts, replica_rss_mb()))
            await asyncio.sleep(sample_s)
        result.samples.append((time.perf_counter() - started, result.texts, replica_rss_mb()))

    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        await asyncio.gather(sampler(), *(client(i, session) for i in range(clients)))
        result.seconds = time.perf_counter() - started
        result.peaks = replica_rss_mb("VmHWM")
        async with session.get(f"{url}/v1/models") as resp:
            result.allocator = (await resp.json())["data"][0]["allocator"]
    return result


def without_cache(models_config: str, disk_gb: float | None = None) -> str:
    """A copy of ``models_config`` with every model's cache off, in a new temporary folder (paths that
    were relative to the original's folder made absolute); with ``disk_gb``, every model's disk cache
    alone on, in that folder."""
    import tempfile

    import yaml

    original = Path(models_config).resolve()
    data = yaml.safe_load(original.read_text())
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    for entry in data["models"]:
        entry.pop("cache", None)
        if disk_gb is not None:
            entry["cache"] = {"disk_gb": disk_gb, "disk_dir": str(folder / "vectors")}
        for key in ("source", "compile_cache_dir"):
            value = entry.get(key)
            if isinstance(value, str) and (original.parent / value).exists():
                entry[key] = str(original.parent / value)
    path = folder / original.name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run_soak(models_config: str, port: int, haproxy: bool, allocator: str, **kwargs) -> SoakResult:
    """A private service, soaked, then stopped."""
    if allocator == "system":
        os.environ["EMBEDDINGS_ALLOCATOR"] = "system"
        if "jemalloc" in os.environ.get("LD_PRELOAD", ""):  # inherited from a shell or the test suite
            os.environ.pop("LD_PRELOAD")
    url = start_local_service(models_config, port, haproxy)
    try:
        return asyncio.run(soak(url, **kwargs))
    finally:
        stop_local_service()


def report(result: SoakResult) -> str:
    lat = np.array(result.latencies) * 1e3 if result.latencies else np.zeros(1)
    warm_s, warm_texts = result.warm_at or (0.0, 0)
    lines = [
        f"{result.texts} texts in {result.requests} requests over {result.seconds / 60:.1f} min "
        f"({result.texts / max(result.seconds, 1e-9):.1f} texts/s), errors {len(result.errors)}, "
        f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms; warm-up to "
        f"{warm_s / 60:.1f} min ({warm_texts} texts); allocator {result.allocator}",
        "",
        "| replica | RSS after warm-up MB | RSS at end MB | growth MB | max MB | peak since start MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (first, last, peak) in result.growth().items():
        since_start = result.peaks.get(name)
        since = f"{since_start:.0f}" if since_start is not None else "-"
        lines.append(f"| {name} | {first:.0f} | {last:.0f} | {last - first:+.0f} | {peak:.0f} | {since} |")
    lines += [
        "",
        "| minute | texts | " + " | ".join(f"RSS {n.split(' ')[0]}" for n in result.growth()) + " |",
    ]
    last_minute = -1
    for t, n, rss in result.samples:
        if int(t // 60) > last_minute:
            last_minute = int(t // 60)
            lines.append(f"| {t / 60:.1f} | {n} | " + " | ".join(f"{v:.0f}" for v in rss.values()) + " |")
    for error in result.errors[:5]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--texts", type=int, default=10**9)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--warmup-texts", type=int, default=10**9)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--allocator", choices=["jemalloc", "system"], default="jemalloc")
    parser.add_argument("--no-cache", action="store_true", help="every model's embedding cache off")
    parser.add_argument("--disk-gb", type=float, default=None, help="the disk cache alone, this size")
    parser.add_argument("--shape", default=None, help="the default model's weights: a random-weight "
                        "model of this shape (model_shapes.py), e.g. bge-large; every cache off")  # fmt: skip
    add_ingress_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.disk_gb is not None:
        models_config = without_cache(args.models_config, args.disk_gb)
        print(f"models config {models_config} (the memory cache off, disk_gb {args.disk_gb:g})")
    else:
        copy = args.no_cache or args.shape
        models_config = without_cache(args.models_config) if copy else args.models_config
        print(f"models config {models_config}" + (" (every cache off)" if copy else ""))
    if args.shape:
        models_config = with_shape(models_config, args.shape)
        print(f"the default model: a {args.shape} shape with random weights")
    result = run_soak(
        models_config, args.port, use_haproxy(args), args.allocator,
        clients=args.clients, deadline_s=args.minutes * 60, max_texts=args.texts,
        warmup_s=args.warmup_minutes * 60, warmup_texts=args.warmup_texts, sample_s=args.sample_s,
    )  # fmt: skip
    print(report(result))
    sys.exit(1 if result.errors else 0)


if __name__ == "__main__":
    main()
