"""A redeploy of a changed models config loses nothing: 16 clients keep sending while the app is updated
(a model's replica count and a new alias), through ``serve.run`` and through the ``serve deploy`` command,
and every request is answered 200 with exact vectors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.common import write_serve_config
from tests.conftest import (
    deploy_app,
    free_port,
    model_entry,
    models_config,
    serve_app,
    start_private_ray,
    write_models_config,
)

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Marie Curie", "Warsaw is the capital of Poland", "radioactivity", "Pierre Curie, physicist"]


def write_config(path: Path, replicas: int, aliases: list[str]) -> str:
    entry = model_entry(MODEL, aliases=aliases, num_replicas=replicas)
    return write_models_config(path, models_config(entry, num_cpus=0.5))


def run_under_load(url: str, redeploy: Callable[[], None], expected: np.ndarray) -> list[tuple[int, float]]:
    """16 clients send requests before, during and after ``redeploy``; (status, worst cosine) per request."""
    outcomes: list[tuple[int, float]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                texts = TEXTS[i % 4 :] + TEXTS[: i % 4]
                resp = http.post(url, json={"input": texts, "model": "semantic_dedup"})
                if resp.status_code != 200:
                    outcomes.append((resp.status_code, 0.0))
                    continue
                got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
                want = np.concatenate([expected[i % 4 :], expected[: i % 4]])
                cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
                outcomes.append((200, float(cosine.min())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        before = len(outcomes)
        redeploy()
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    during = len(outcomes) - before
    assert before > 0 and during > 16, (before, during)  # traffic flowed before, during and after
    failures = [o for o in outcomes if o[0] != 200 or o[1] < 0.9999]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed or were inexact: {failures[:5]}"
    return outcomes


def assert_v2_is_live(url: str) -> None:
    from ray import serve

    new_alias = httpx.post(url, json={"input": "Warsaw", "model": "tree_comm"}, timeout=60)
    assert new_alias.status_code == 200  # the new config is live
    deployments = serve.status().applications["embeddings"].deployments
    assert deployments[MODEL].replica_states.get("RUNNING") == 2


def test_a_redeploy_under_load_answers_every_request_exactly(tmp_path_factory, tmp_path, minilm):
    from ray import serve

    ray = start_private_ray(tmp_path_factory, num_cpus=4)
    try:
        url = serve_app(write_config(tmp_path / "v1.yaml", replicas=1, aliases=["semantic_dedup"]))
        url += "/v1/embeddings"
        v2 = write_config(tmp_path / "v2.yaml", replicas=2, aliases=["semantic_dedup", "tree_comm"])

        def redeploy() -> None:
            deploy_app(v2)

        run_under_load(url, redeploy, minilm.encode(TEXTS))
        assert_v2_is_live(url)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.long  # a second Ray with its dashboard, minutes: make test-long
def test_serve_deploy_of_a_changed_config_answers_every_request(tmp_path_factory, tmp_path, minilm):
    """The same through the operator's command: ``serve deploy`` to the cluster's dashboard address."""
    from ray import serve

    dashboard = free_port()
    ray = start_private_ray(tmp_path_factory, num_cpus=4, include_dashboard=True, dashboard_port=dashboard)
    address = f"http://127.0.0.1:{dashboard}"
    serve_bin = str(Path(sys.executable).parent / "serve")
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        v1 = write_config(tmp_path / "v1.yaml", replicas=1, aliases=["semantic_dedup"])
        v2 = write_config(tmp_path / "v2.yaml", replicas=2, aliases=["semantic_dedup", "tree_comm"])

        def deploy(models_config: str, version: str) -> None:
            config = write_serve_config(tmp_path / f"serve-{version}.yaml", port, models_config)
            command = [serve_bin, "deploy", config, "--address", address]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            replicas = 2 if version == "v2" else 1
            deadline = time.monotonic() + 180
            while True:  # serve deploy returns once the config is accepted: wait until it runs
                app = serve.status().applications.get("embeddings")
                model = app.deployments.get(MODEL) if app is not None else None
                running = model.replica_states.get("RUNNING", 0) if model is not None else 0
                if app is not None and app.status.value == "RUNNING" and running == replicas:
                    return
                assert time.monotonic() < deadline, f"{version} did not come up: {app}"
                time.sleep(0.5)

        deploy(v1, "v1")
        run_under_load(url, lambda: deploy(v2, "v2"), minilm.encode(TEXTS))
        assert_v2_is_live(url)
    finally:
        serve.shutdown()
        ray.shutdown()
