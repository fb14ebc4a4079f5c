"""Cluster autoscaling with Ray's fake multi-node provider: deploying the app makes the autoscaler launch
a node of the right class for each model, and a burst adds small-GPU nodes.

The node types are ray_cluster.yaml's (names, custom resources, GPU-per-resource ratio), shrunk to fit
one small machine. Everything runs under a private temp dir, and teardown stops exactly what this test
started (the head it launched, then any process of its own session left behind).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, free_port, processes_of

pytestmark = [pytest.mark.ray, pytest.mark.long]  # minutes: make test-long, not make test

FAST = {
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "HF_HUB_OFFLINE": "1",
}
CPUS = {"large_gpu": 1, "small_gpu": 2}
MAX_WORKERS = {"large_gpu": 1, "small_gpu": 2}


def fake_autoscaling_config(gcs_address: str) -> dict:
    """ray_cluster.yaml's worker types for the fake provider: one fake GPU per node, same custom resources."""
    launcher = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    node_types = {"ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}}
    for name, spec in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        per_gpu = {
            k: v // spec["resources"]["GPU"] for k, v in spec["resources"].items() if k not in ("CPU",)
        }
        node_types[name] = {
            "resources": {**per_gpu, "CPU": CPUS[name]},
            "node_config": {},
            "min_workers": 0,
            "max_workers": min(spec["max_workers"], MAX_WORKERS[name]),
        }
    return {
        "cluster_name": "fake-graphrag-embeddings",
        "max_workers": sum(MAX_WORKERS.values()),
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "launch_multiple": True,
            # Fake nodes start already set up: no SSH updater, no launch-config comparison.
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def stop_processes_of(session_root: str) -> None:
    for sig, pause in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
        for pid in processes_of(session_root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + pause
        while processes_of(session_root) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def fake_cluster(tiny_bge_dir):
    import ray
    from ray._private.services import get_node_ip_address

    root = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    gcs = f"{get_node_ip_address()}:{port}"
    config_path = Path(root) / "autoscaling.json"
    config_path.write_text(json.dumps(fake_autoscaling_config(gcs)))
    env = {**os.environ, **FAST, "RAY_TMPDIR": root}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={root}",
            "--include-dashboard=false",
            f"--autoscaling-config={config_path}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    env_here = pytest.MonkeyPatch()
    try:
        for key, value in FAST.items():
            if key != "RAY_FAKE_CLUSTER":
                env_here.setenv(key, value)
        deadline = time.time() + 60
        while True:
            try:
                replica_env = {"HF_HUB_OFFLINE": "1", "EMBEDDINGS_FAKE_GPUS": "1"}  # fake GPUs: run on CPU
                ray.init(address=gcs, runtime_env={"env_vars": replica_env})
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield {"ray": ray, "root": root}
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
            stop_processes_of(root)  # fake worker nodes outlive the head's autoscaler
            shutil.rmtree(root, ignore_errors=True)
            env_here.undo()


def nodes_with(ray, resource: str) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource, 0) > 0]


def wait_for(predicate, timeout: float, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_the_autoscaler_launches_each_class_and_a_burst_adds_small_gpu_nodes(
    fake_cluster, tiny_bge_dir, tmp_path
):
    from ray import serve

    from deployments.app import AppArgs, build_app

    ray = fake_cluster["ray"]
    assert nodes_with(ray, "large_gpu") == [] and nodes_with(ray, "small_gpu") == []  # nothing runs yet

    def model(name, placement, **extra):
        return {
            "name": name,
            "source": tiny_bge_dir,
            "backend": "sentence-transformers",
            "max_seq_length": 128,
            "placement": placement,
            "batching": {"max_batch_tokens": 1024, "max_batch_size": 64},
            **extra,
        }

    config = {
        "default_model": "small",
        "placements": {
            "large_gpu": {"num_gpus": 1.0, "num_cpus": 0.5, "resources": {"large_gpu": 1}},
            "small_gpu": {"num_gpus": 0.25, "num_cpus": 0.25, "resources": {"small_gpu": 0.25}},
        },
        "models": [
            model("big", "large_gpu"),
            model(
                "small",
                "small_gpu",
                autoscaling={
                    "min_replicas": 1,
                    "max_replicas": 6,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 0.5,
                    "downscale_delay_s": 600,
                    "look_back_period_s": 2,
                },
            ),
        ],
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve._run(
        build_app(AppArgs(models_config=str(tmp_path / "models.yaml"))),
        name="embeddings",
        route_prefix="/",
        _blocking=False,
    )

    def healthy():
        deployments = serve.status().applications.get("embeddings")
        return deployments is not None and all(
            d.status.value == "HEALTHY" for d in deployments.deployments.values()
        )

    wait_for(healthy, 240, "the app to be served on autoscaled nodes")
    assert len(nodes_with(ray, "large_gpu")) == 1 and len(nodes_with(ray, "small_gpu")) == 1

    texts = [f"{i} " + "graph community summary " * 40 for i in range(64)]
    stop = threading.Event()
    statuses: list[int] = []

    async def burst():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:

            async def worker():
                while not stop.is_set():
                    r = await client.post("/v1/embeddings", json={"input": texts, "model": "small"})
                    statuses.append(r.status_code)

            await asyncio.gather(*(worker() for _ in range(12)))

    loader = threading.Thread(target=lambda: asyncio.run(burst()))
    loader.start()
    try:
        wait_for(
            lambda: len(nodes_with(ray, "small_gpu")) >= 2, 240, "a second small-GPU node under the burst"
        )
    finally:
        stop.set()
        loader.join()
    assert statuses and set(statuses) == {200}
    assert len(nodes_with(ray, "large_gpu")) == 1  # the burst on a small model never adds large GPUs
