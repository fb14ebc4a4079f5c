"""``python -m deployments.tools.serve_local``: ``serve run configs/local.yaml`` on the lean HTTP path when
it can.

With an HAProxy (the system's, else the one ``ray[serve]`` installs: ``find_haproxy``), Ray Serve's
HAProxy ingress is turned on (``RAY_SERVE_ENABLE_HA_PROXY``, which implies direct ingress): HAProxy
listens on the configured port and forwards each request straight to the ingress replica's own HTTP
server, so no Python proxy actor and no actor call sit on the request path (what that is worth:
docs/performance.md). Without HAProxy (or with ``EMBEDDINGS_HAPROXY=0``)
the same command serves through Serve's proxy as usual. Either way Serve runs the request code on the
replica's own event loop (``serving_env``).

Serve reads these variables in its controller and replicas, which inherit the environment of the
process that starts Ray, so they are set before ``serve run`` starts it.

Several services on one machine: each gets its own free ports for the listeners Serve would otherwise
put on fixed ones (HAProxy's stats page and Prometheus exporter, the fallback proxy that HAProxy sends
to while no replica is up), and HAProxy's stats page and exporter listen where the service listens
(``http_options.host``) rather than on every interface, which Ray 2.60's template hard-codes: HAProxy
is started through a two-line wrapper that rewrites those two ``bind`` lines (``haproxy_wrapper``).

Beside ``serve run`` it starts ``python -m deployments.tools.compile_cache`` for each models config, so on a
fresh machine the OpenVINO conversion runs while Ray and Serve start (about 15 s here) and the replica
finds the cached graph; where the cache is filled already, that process only checks the keys.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from deployments.config import ConfigError, load_models_config
from deployments.engine.allocator import allocator_env
from deployments.engine.sizing import OBJECT_STORE_PROPORTION_ENV, check_one_machine, this_machine
from deployments.tools.haproxy_wrapper import find_haproxy, haproxy_wrapper

DEFAULT_SERVE_CONFIG = "configs/local.yaml"
# Serve's default HTTP host, where http_options does not say.
DEFAULT_HOST = "127.0.0.1"
# Listeners Serve puts on fixed ports (8404, 9101, 8500, 9500): one service's would block or, for the
# fallback proxy (bound with SO_REUSEPORT), silently share with another's. Each gets a free port unless
# the operator set it.
SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
# How long a direct-ingress replica keeps answering after it is told to stop, so a load balancer sees
# it leave first. Serve's default (30 s) suits a cluster; one machine with one HAProxy needs seconds.
LOCAL_DRAINING_S = "2"
# HAProxy closes a connection that sends nothing for this long while HAProxy waits on it (headers not
# finished, a body stalled), with a 408. Serve's default is an hour; Ray 2.60 offers no separate header
# timeout (HAProxy's "timeout http-request"). An answer that takes longer is not cut: HAProxy does not
# wait on the client then. An operator's own RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S wins.
LOCAL_CLIENT_TIMEOUT_S = "30"
# Ray gives its object store 30% of a node's memory by default and keeps that from the `memory` replicas
# can reserve; this service moves only vectors through it (a full 2,048-input NV-Embed answer is 34 MB),
# so one machine keeps 10% for it and the rest for models (NV-Embed-v2 needs 17.5 GB on a 24 GB host).
LOCAL_OBJECT_STORE_PROPORTION = "0.1"


def serving_env(host: str = DEFAULT_HOST) -> dict[str, str]:
    """Everything ``make serve`` sets: Serve runs our request code on the replica's own event loop (our
    code never blocks it: model work runs on the engine's threads, so the extra thread hop of Serve's
    default buys nothing), jemalloc preloaded when installed (a replica's memory stays flat:
    ``deployments/engine/allocator.py``), plus the HAProxy ingress when an HAProxy is found, its side
    listeners on free ports of ``host``, the address the service listens on."""
    return {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        OBJECT_STORE_PROPORTION_ENV: os.environ.get(
            OBJECT_STORE_PROPORTION_ENV, LOCAL_OBJECT_STORE_PROPORTION
        ),
        **allocator_env(),
        **side_ports_env(host),
        **haproxy_env(host=host),
    }


# Ports the kernel hands out on its own (to every ``bind(0)`` and outgoing connection) are read from here;
# Ray's workers take 10002-19999 by default.
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
QUIET_PORTS = (20000, 32768)


def quiet_port_range(ephemeral_range_file: Path = EPHEMERAL_RANGE_FILE) -> range:
    """Ports between Ray's worker ports and the kernel's ephemeral range: a port picked here stays free
    until Serve binds it, where one the kernel gave out (``bind(0)``) can be handed again to any of the
    many connections Ray opens while it starts (seen once: HAProxy's exporter found its port taken).
    Empty when the ephemeral range starts below it (then ``free_ports`` asks the kernel)."""
    low, high = QUIET_PORTS
    try:
        high = min(high, int(ephemeral_range_file.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    return range(low, high)


def free_ports(host: str, count: int, candidates: range | None = None) -> list[int]:
    """``count`` distinct ports free on ``host`` now, from ``quiet_port_range`` in random order (held open
    together, so no two are the same); from the kernel when that range has none free. Another program may
    still take one before Serve binds it; Serve then reports the bind error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = quiet_port_range() if candidates is None else candidates
    held: list[socket.socket] = []
    try:
        for port in random.sample(candidates, min(len(candidates), 64 * count)):
            if len(held) == count:
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        while len(held) < count:  # no quiet port free: the kernel's choice
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def side_ports_env(host: str = DEFAULT_HOST) -> dict[str, str]:
    """A free port for each of Serve's fixed-port side listeners (``SIDE_PORTS``); an operator's own
    value is kept."""
    env = {name: os.environ[name] for name in SIDE_PORTS if os.environ.get(name)}
    missing = [name for name in SIDE_PORTS if name not in env]
    ports = free_ports(host, len(missing))
    return {**env, **{name: str(port) for name, port in zip(missing, ports, strict=True)}}


STATE_PREFIX = "hap-"
OWNER_FILE = "owner.pid"


def remove_ended_states(parent: Path) -> list[Path]:
    """Remove the HAProxy state directories (``haproxy_env``) of services that have ended; returns them.
    ``make serve`` execs ``serve run``, so nothing is left to remove its directory when it ends: each one
    records the pid of the process that serves with it, and the next start removes those whose process is
    gone. A directory without that record (another tool's, or one being made) is left alone."""
    removed = []
    for state in parent.glob(STATE_PREFIX + "*"):
        try:
            pid = int((state / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # still serving
        except PermissionError:
            continue  # another user's process: alive
        except ProcessLookupError:
            shutil.rmtree(state, ignore_errors=True)
            removed.append(state)
    return removed


def haproxy_env(haproxy: str | None = None, host: str = DEFAULT_HOST) -> dict[str, str]:
    """The variables that turn on Serve's HAProxy ingress, or {} when no HAProxy is found
    (``find_haproxy``) or ``EMBEDDINGS_HAPROXY=0``. HAProxy's files go to a new private directory rather
    than Serve's fixed ``/tmp/haproxy-serve``, so two services on one machine do not collide, and HAProxy
    is started through ``haproxy_wrapper`` so its side listeners stay on ``host``."""
    haproxy = haproxy or find_haproxy()
    if not haproxy or os.environ.get("EMBEDDINGS_HAPROXY", "1") == "0":
        return {}
    # Short: HAProxy refuses socket paths over 97 characters, and Serve adds a 40-character node id.
    parent = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())
    remove_ended_states(parent)
    state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=parent))
    (state / OWNER_FILE).write_text(str(os.getpid()))  # this process, which becomes `serve run` (exec)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(haproxy_wrapper(state, haproxy, host)),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": LOCAL_DRAINING_S,
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": os.environ.get(
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", LOCAL_CLIENT_TIMEOUT_S
        ),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
    }


def applications(serve_config: str | Path) -> list[dict]:
    """The application entries of a Serve config; none where it does not parse (``serve run`` says why)."""
    try:
        raw = yaml.safe_load(Path(serve_config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    apps = (raw.get("applications") or []) if isinstance(raw, dict) else []
    return [app for app in apps if isinstance(app, dict)]


def models_configs(serve_config: str | Path) -> list[str]:
    """The ``models_config`` argument of every application in a Serve config."""
    found = [(app.get("args") or {}).get("models_config") for app in applications(serve_config)]
    return [path for path in found if isinstance(path, str)]


def http_host(serve_config: str | Path) -> str:
    """``http_options.host`` of a Serve config (Serve's default where it does not say)."""
    try:
        raw = yaml.safe_load(Path(serve_config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return DEFAULT_HOST  # serve run reports it
    options = raw.get("http_options") if isinstance(raw, dict) else None
    host = options.get("host") if isinstance(options, dict) else None
    return host if isinstance(host, str) and host else DEFAULT_HOST


def fill_compile_caches(serve_config: str | Path, env: dict[str, str]) -> None:
    """Start filling the compile cache of each models config in the background (one torch thread: Ray's
    start needs the other core); its lines go to this command's stderr, and it exits when ``serve run``
    (this process, after the exec) does."""
    for models in models_configs(serve_config):
        subprocess.Popen(  # noqa: S603 - our own module, on a path from the operator's config
            [sys.executable, "-m", "deployments.tools.compile_cache", models, "--parent", str(os.getpid())],
            env={**env, "OMP_NUM_THREADS": "1"},
            stdin=subprocess.DEVNULL,
        )


def one_machine_problems(serve_config: str | Path, env: dict[str, str]) -> list[str]:
    """What no replica of the served models configs could get on this machine (``sizing.check_one_machine``),
    with Ray's object store at the share ``env`` gives it; a models config that does not parse is left to
    ``serve run``, which reports it."""
    machine = this_machine(float(env[OBJECT_STORE_PROPORTION_ENV]))
    problems = []
    for path in models_configs(serve_config):
        try:
            config = load_models_config(path)
        except ConfigError:
            continue
        problems += [f"{path}: {p}" for p in check_one_machine(config, machine)]
    return problems


def main(argv: list[str]) -> None:
    config = argv[0] if argv else DEFAULT_SERVE_CONFIG
    host = http_host(config)
    extra = serving_env(host)
    problems = one_machine_problems(config, extra)
    if problems:
        print("cannot serve on this machine:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
        sys.exit(2)
    how = (
        "HAProxy ingress (direct to the replica)"
        if "RAY_SERVE_ENABLE_HA_PROXY" in extra
        else "Serve's HTTP proxy (no HAProxy found, or EMBEDDINGS_HAPROXY=0)"
    )
    env = {**os.environ, **extra}
    preloaded = [p for p in env.get("LD_PRELOAD", "").split() if "jemalloc" in p]
    allocator = preloaded[0] if preloaded else "glibc malloc"  # an operator's own preload counts too
    print(f"serving {config} through {how}, allocator {allocator}", file=sys.stderr, flush=True)
    if "RAY_SERVE_ENABLE_HA_PROXY" in extra:
        print(
            f"HAProxy stats http://{host}:{extra['RAY_SERVE_HAPROXY_STATS_PORT']}/stats, Prometheus "
            f"http://{host}:{extra['RAY_SERVE_HAPROXY_METRICS_PORT']}/metrics",
            file=sys.stderr,
            flush=True,
        )
    fill_compile_caches(config, env)
    # `serve run`, draining its routers when stopped (SIGTERM or Ctrl-C) instead of cutting their requests
    os.execve(sys.executable, [sys.executable, "-m", "deployments.tools.serve_run", config, *argv[1:]], env)


if __name__ == "__main__":
    main(sys.argv[1:])
