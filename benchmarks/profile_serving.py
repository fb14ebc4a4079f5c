"""Where a request's CPU goes in the running service: per process, and inside the replica per activity.

Starts a private service as ``make serve`` does (HAProxy when installed, cache off), sends a workload
over HTTP (``--clients`` concurrent clients, ``--per-request`` texts each, from a text mix), and reports:
- CPU milliseconds per request of every process that used any (from /proc: the replica running the
  model, HAProxy, Ray's processes, this load generator);
- a py-spy profile of the replica's threads (sampled at ``--rate`` Hz), grouped by activity: the forward
  pass, tokenisation, the scheduler, HTTP (uvicorn/Starlette/FastAPI), our request code (parse, cache,
  render), Serve's replica machinery, other.

    python benchmarks/profile_serving.py --mix short --clients 32 --per-request 1
    python benchmarks/profile_serving.py --mix kt_gen --clients 8 --per-request 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import client_connector, drive, http_sender  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MIXES,
    add_ingress_option,
    config_with_cache,
    start_local_service,
    stop_local_service,
    use_haproxy,
)

# Activity of a py-spy stack, by the first rule (innermost frame first) that matches one of its frames.
ACTIVITIES = [
    ("forward pass", ("openvino", "infer", "forward", "_pass", "torch/nn")),
    ("tokenisation", ("tokeniz", "preprocess")),
    ("scheduler", ("scheduler.py",)),
    ("HTTP (uvicorn, Starlette, FastAPI)", ("uvicorn", "starlette", "fastapi", "h11", "httptools")),
    ("request code (parse, cache, render)", ("deployments/",)),
    ("Serve replica machinery", ("ray/serve", "ray/_private", "ray/_raylet")),
]


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """Every process's (name, utime + stime in clock ticks)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (cmd[:80] or stat[stat.index("(") + 1 : stat.rindex(")")],
                                int(fields[11]) + int(fields[12]))  # fmt: skip
    return out


def replica_pid() -> int:
    for pid, (name, _) in cpu_ticks().items():
        if name.startswith("ray::ServeReplica:embeddings:EmbeddingRouter"):
            return pid
    raise RuntimeError("no EmbeddingRouter replica process found")


def activity(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, needles in ACTIVITIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--mix", default="short", choices=list(MIXES))
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--port", type=int, default=8124)
    add_ingress_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = MIXES[args.mix](args.texts)
    url = start_local_service(config_with_cache(args.models_config, None), args.port, use_haproxy(args))
    try:
        import aiohttp

        async def load(batch):
            async with aiohttp.ClientSession(connector=client_connector()) as session:
                send = http_sender(session, f"{url}/v1/embeddings", "all-MiniLM-L6-v2")
                return await drive(send, batch, args.clients, args.per_request)

        asyncio.run(load(texts[:256]))  # warm-up
        pid = replica_pid()
        raw = Path(tempfile.mkdtemp(prefix="profile-")) / "replica.txt"
        py_spy = str(Path(sys.executable).parent / "py-spy")
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
             "--output", str(raw), "--nonblocking", "--threads"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
        before = cpu_ticks()
        result = asyncio.run(load(texts))
        after = cpu_ticks()
        spy.send_signal(2)
        spy.wait(30)
    finally:
        stop_local_service()
    requests = len(result.latencies)
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    used = Counter()
    for p, (name, ticks) in after.items():
        if p in before and ticks > before[p][1]:
            label = "this load generator" if p == os.getpid() else name
            used[label] += (ticks - before[p][1]) * tick_ms
    print(f"\n{args.mix} mix, {args.clients} clients x {args.per_request} text(s), {requests} requests, "
          f"{result.rate:.1f} texts/s, p50 {result.pct(50):.1f} ms\n")  # fmt: skip
    print("| process | CPU ms per request |\n| --- | ---: |")
    for name, ms in used.most_common():
        if ms / requests >= 0.05:
            print(f"| {name} | {ms / requests:.2f} |")
    samples = Counter()
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                samples[activity(stack)] += int(count)
    total = sum(samples.values()) or 1
    print("\n| replica activity (py-spy, busy samples) | share |\n| --- | ---: |")
    for name, count in samples.most_common():
        print(f"| {name} | {count / total:.1%} |")


if __name__ == "__main__":
    main()
