"""A cluster closed by Ray's token authentication: the app serves, ServeEmbedder with the token works, and
drivers without it (or with another) are refused. Each side runs in its own process: a Ray driver keeps its
authentication mode for its lifetime, and this test's own process runs without authentication."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

SERVER = """
import os, sys, time, tempfile
import ray
from ray import serve
from deployments.app import AppArgs, build_app
temp = tempfile.mkdtemp(prefix="ray-token-")
ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": 0})
serve.run(build_app(AppArgs(models_config="configs/models.local.yaml")), name="embeddings", route_prefix="/")
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
stop = sys.argv[1]
while not os.path.exists(stop):
    time.sleep(0.2)
serve.shutdown()
ray.shutdown()
"""

CLIENT = """
import sys
from clients import ServeEmbedder
print("SHAPE", ServeEmbedder("all-MiniLM-L6-v2", address=sys.argv[1]).encode("Marie Curie").shape, flush=True)
"""


def env_with(**auth: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(auth)
    return env


def test_token_auth_cluster_serves_only_drivers_with_the_token(tmp_path: Path):
    stop = tmp_path / "stop"
    token = "f" * 32 + "0" * 32
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(stop)],
        cwd=REPO,
        env=env_with(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        gcs = None
        deadline = time.monotonic() + 180
        while gcs is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if line.startswith("GCS "):
                gcs = line.split()[1]
            elif not line and server.poll() is not None:
                break
        assert gcs, "the token-auth service did not start"

        def client(**auth: str) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-c", CLIENT, gcs],
                cwd=REPO,
                env=env_with(**auth),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        good = client(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        out, err = good.communicate(timeout=120)
        assert good.returncode == 0 and "SHAPE (384,)" in out, err[-2000:]
        # The refused drivers give up after Ray's ~20 s of connection retries: both at once.
        wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "e" * 64}
        refused = [(auth, client(**auth)) for auth in (wrong, {"RAY_AUTH_MODE": "disabled"})]
        for auth, driver in refused:
            out, _ = driver.communicate(timeout=120)
            assert driver.returncode != 0 and "SHAPE" not in out, (auth, out)
    finally:
        stop.touch()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.terminate()
            server.wait(30)
