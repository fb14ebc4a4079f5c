"""Heterogeneous placement on a real multi-node Ray (ray.cluster_utils.Cluster, fake GPUs): each model's
replicas land only on nodes of its class, quarter-GPU replicas pack four to a GPU, a class with no node
stays pending and is reported, and requests route correctly throughout."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import Counter, defaultdict

import httpx
import numpy as np
import pytest
import yaml
from sentence_transformers import SentenceTransformer

from tests.conftest import free_port

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

BGE_QUERY = "Represent this sentence for searching relevant passages: "
TEXTS = ["Marie Curie", "", "Warsaw is the capital of Poland"]


def write_config(path, model_dir: str) -> str:
    def model(name, placement, replicas, **extra):
        return {
            "name": name,
            "source": model_dir,
            "backend": "sentence-transformers",
            "max_seq_length": 128,
            "prompts": {"query": BGE_QUERY, "passage": ""},
            "placement": placement,
            "num_replicas": replicas,
            **extra,
        }

    config = {
        "default_model": "small",
        "placements": {
            "large_gpu": {
                "num_gpus": 1.0,
                "num_cpus": 0.5,
                "resources": {"large_gpu": 1},
                "gpu_memory_gb": 80,
            },
            "small_gpu": {
                "num_gpus": 0.25,
                "num_cpus": 0.25,
                "resources": {"small_gpu": 0.25},
                "gpu_memory_gb": 24,
            },
            "xl_gpu": {"num_gpus": 1.0, "num_cpus": 0.5, "resources": {"xl_gpu": 1}},
        },
        "models": [
            model("big", "large_gpu", 1, default_prompt="query"),
            model("small", "small_gpu", 12),  # 3 small GPUs x 4 quarter-GPU slots
            model("orphan", "xl_gpu", 1),  # no node provides xl_gpu
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_bge_dir):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    env = pytest.MonkeyPatch()
    env.setenv("RAY_SERVE_SLOW_STARTUP_WARNING_S", "2")  # Serve explains pending replicas sooner
    # Our own temp dir: Cluster records its address there, never in a shared /tmp/ray.
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env.setenv("RAY_TMPDIR", ray_tmp)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
        nodes = {
            "large": cluster.add_node(num_cpus=1, num_gpus=1, resources={"large_gpu": 1}),
            "small-1gpu": cluster.add_node(num_cpus=2, num_gpus=1, resources={"small_gpu": 1}),
            "small-2gpu": cluster.add_node(num_cpus=3, num_gpus=2, resources={"small_gpu": 2}),
        }
        replica_env = {"HF_HUB_OFFLINE": "1", "EMBEDDINGS_FAKE_GPUS": "1"}  # fake GPUs here: run on CPU
        ray.init(address=cluster.address, runtime_env={"env_vars": replica_env})
        from deployments.app import AppArgs, build_app

        config = write_config(tmp_path_factory.mktemp("cfg") / "models.yaml", tiny_bge_dir)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        # Non-blocking deploy: serve.run would wait forever for the orphan class that no node provides.
        serve._run(
            build_app(AppArgs(models_config=config)), name="embeddings", route_prefix="/", _blocking=False
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            deployments = serve.status().applications["embeddings"].deployments
            if all(deployments[n].status.value == "HEALTHY" for n in ("big", "small", "EmbeddingRouter")):
                break
            time.sleep(2)
        else:
            pytest.fail(f"big/small never became healthy: {serve.status()}")
        node_ids = {name: node.node_id for name, node in nodes.items()}
        yield {"url": f"http://127.0.0.1:{port}", "nodes": node_ids, "ray": ray}
    finally:  # stop exactly what this fixture started, even when setting up failed half-way
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        env.undo()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def replica_infos(model: str, expected: int) -> list[dict]:
    """info() from every replica of a model: call until each replica has answered."""
    from ray import serve

    handle = serve.get_deployment_handle(model, "embeddings")
    seen: dict[str, dict] = {}
    for _ in range(400):
        info = handle.info.remote().result()
        seen[info["replica_id"]] = info
        if len(seen) == expected:
            break
    assert len(seen) == expected, f"saw {len(seen)} of {expected} replicas of {model}"
    return list(seen.values())


def test_replicas_land_only_on_nodes_of_their_class(cluster):
    nodes = cluster["nodes"]
    big = replica_infos("big", 1)
    assert [i["node_id"] for i in big] == [nodes["large"]]
    small = replica_infos("small", 12)
    per_node = Counter(i["node_id"] for i in small)
    assert per_node == {nodes["small-1gpu"]: 4, nodes["small-2gpu"]: 8}


def test_quarter_gpu_replicas_pack_four_to_a_gpu_and_see_their_own_device(cluster):
    nodes = cluster["nodes"]
    by_gpu = defaultdict(list)
    for info in replica_infos("small", 12):
        assert len(info["gpu_ids"]) == 1 and info["cuda_visible_devices"] == info["gpu_ids"][0]
        by_gpu[(info["node_id"], info["cuda_visible_devices"])].append(info["replica_id"])
    assert sorted(len(v) for v in by_gpu.values()) == [4, 4, 4]
    two_gpu_devices = {dev for node, dev in by_gpu if node == nodes["small-2gpu"]}
    assert len(two_gpu_devices) == 2  # the 2-GPU node's replicas see different CUDA_VISIBLE_DEVICES


def test_a_class_without_nodes_stays_pending_and_is_reported(cluster):
    from ray import serve

    orphan = serve.status().applications["embeddings"].deployments["orphan"]
    assert orphan.status.value != "HEALTHY"
    health = httpx.get(f"{cluster['url']}/health", timeout=60)
    assert health.status_code == 503
    models = health.json()["models"]
    assert models["big"] == "ok" and models["small"] == "ok"
    assert "xl_gpu" in models["orphan"], models["orphan"]  # Serve's message names the missing resource


def test_models_and_clients_answer_within_seconds_while_a_model_is_pending(cluster):
    from clients import HTTPEmbedder

    t0 = time.monotonic()
    listed = {m["id"]: m for m in httpx.get(f"{cluster['url']}/v1/models", timeout=30).json()["data"]}
    assert time.monotonic() - t0 < 8
    assert listed["orphan"]["dimension"] is None and listed["orphan"]["state"].startswith("pending")
    assert "xl_gpu" in listed["orphan"]["state"]
    assert listed["big"]["state"] == "ready" and listed["big"]["dimension"] == 32
    t0 = time.monotonic()
    client = HTTPEmbedder("small", base_url=cluster["url"])
    assert time.monotonic() - t0 < 8 and client.encode("Warsaw").shape == (32,)
    resp = httpx.post(
        f"{cluster['url']}/v1/embeddings", json={"input": "x", "model": "big", "dimensions": 64}, timeout=30
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "dimensions"


def test_requests_route_to_the_right_model(cluster, tiny_bge_dir):
    reference = SentenceTransformer(tiny_bge_dir, device="cpu")
    for model, prompt in (("big", BGE_QUERY), ("small", None)):
        resp = httpx.post(
            f"{cluster['url']}/v1/embeddings", json={"input": TEXTS, "model": model}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
        expected = reference.encode(TEXTS, prompt=prompt)
        assert ((got * expected).sum(1)).min() >= 0.9999
