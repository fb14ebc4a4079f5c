"""Serve autoscaling under a burst, overload answered fast, a replica killed mid-load, an input that kills
replicas, and a replica whose device failed for good replaced through its health check (real Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from tests.conftest import (
    deploy_app,
    model_entry,
    models_config,
    serve_app,
    write_models_config,
)
from tests.fatal_module import build_fatal_bge, build_poisoned_context_bge

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

FAST_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


def model(name: str, model_dir: str, **extra) -> dict:
    return model_entry(name, model_dir, batching={"max_batch_tokens": 1024, "max_batch_size": 64}, **extra)


@pytest.fixture(scope="module")
def fatal_bge_dir(tmp_path_factory, tiny_bge_dir) -> str:
    return build_fatal_bge(tiny_bge_dir, tmp_path_factory.mktemp("fatal-bge"))


@pytest.fixture(scope="module")
def poisoned_context_bge_dir(tmp_path_factory, tiny_bge_dir) -> str:
    return build_poisoned_context_bge(tiny_bge_dir, tmp_path_factory.mktemp("poisoned-context-bge"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_bge_dir, fatal_bge_dir, poisoned_context_bge_dir):
    import ray
    from ray import serve

    env = pytest.MonkeyPatch()
    for key, value in FAST_METRICS.items():  # inherited by the raylet, hence by the controller and replicas
        env.setenv(key, value)
    try:
        ray.init(
            num_cpus=4,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            include_dashboard=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **FAST_METRICS}},
        )
        config = {
            "default_model": "sturdy",
            "placements": {"cpu": {"num_cpus": 0.5}},
            "models": [
                model("sturdy", tiny_bge_dir),
                model(
                    "elastic",
                    tiny_bge_dir,
                    autoscaling={
                        "min_replicas": 1,
                        "max_replicas": 3,
                        "target_ongoing_requests": 1,
                        "upscale_delay_s": 0.5,
                        "downscale_delay_s": 3,
                        "look_back_period_s": 2,
                    },
                ),
                model("fatal", fatal_bge_dir, trust_remote_code=True),  # "volcano" kills its replica
                # "volcano" poisons its replica's (pretend) CUDA context: the error CUDA raises, for good
                model("cursed", poisoned_context_bge_dir, trust_remote_code=True),
            ],
        }
        url = serve_app(write_models_config(tmp_path_factory.mktemp("cfg") / "models.yaml", config))
        yield {"url": url, "ray": ray}
    finally:
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        env.undo()


def running_replicas(name: str) -> int:
    from ray import serve

    states = serve.status().applications["embeddings"].deployments[name].replica_states
    return states.get("RUNNING", 0)


def wait_for(predicate, timeout: float, what: str) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return time.time() - t0
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.long  # the autoscaler: make test-long
def test_a_burst_scales_the_model_up_to_max_and_back_down(service):
    texts = [f"{i} " + "graph community summary " * 40 for i in range(64)]
    stop = threading.Event()
    errors: list[str] = []

    async def load():
        async with httpx.AsyncClient(base_url=service["url"], timeout=120) as client:

            async def worker():
                while not stop.is_set():
                    r = await client.post("/v1/embeddings", json={"input": texts, "model": "elastic"})
                    if r.status_code != 200:
                        errors.append(r.text)

            await asyncio.gather(*(worker() for _ in range(8)))

    assert running_replicas("elastic") == 1
    loader = threading.Thread(target=lambda: asyncio.run(load()))
    loader.start()
    try:
        wait_for(lambda: running_replicas("elastic") == 3, 90, "3 replicas under load")
    finally:
        stop.set()
        loader.join()
    assert errors == []
    wait_for(lambda: running_replicas("elastic") == 1, 90, "scale back to 1 replica")


@pytest.mark.long  # chaos: make test-long
def test_a_replica_killed_mid_load_is_invisible_to_callers(service, tiny_bge_dir):
    ray = service["ray"]
    reference = SentenceTransformer(tiny_bge_dir, device="cpu")
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#sturdy#" in a["name"]]
    assert len(replicas) == 1
    texts = [f"entity {i} described at some length " * 3 for i in range(16)]
    expected = reference.encode(texts)

    async def load():
        async with httpx.AsyncClient(base_url=service["url"], timeout=120) as client:

            async def worker(k):
                results = []
                t_end = time.time() + 12
                while time.time() < t_end:
                    r = await client.post(
                        "/v1/embeddings", json={"input": texts[k : k + 4], "model": "sturdy"}
                    )
                    results.append((k, r.status_code, r.json()))
                return results

            return await asyncio.gather(*(worker(k) for k in range(0, 16, 4)))

    def kill_soon():
        time.sleep(2)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    results = [r for worker in asyncio.run(load()) for r in worker]
    killer.join()
    after = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#sturdy#" in a["name"]]
    assert replicas[0]["name"] not in after and len(after) == 1  # killed, and replaced
    assert [status for _, status, _ in results] == [200] * len(results)
    for k, _, body in results:
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        assert ((got * expected[k : k + 4]).sum(1)).min() >= 0.9999


def test_overload_gets_a_fast_503_with_retry_after(service, tmp_path, tiny_bge_dir):
    """Past the router's ongoing + queued limits, the router answers its JSON 503 + Retry-After at once."""
    from ray import serve

    config = models_config(
        model("tight", tiny_bge_dir),
        num_cpus=0.5,
        router={"max_ongoing_requests": 2, "max_queued_requests": 2, "retry_after_s": 3},
    )
    deploy_app(write_models_config(tmp_path / "tight.yaml", config), name="tight", route_prefix="/tight")
    texts = ["graph community summary " * 40] * 64

    async def flood():
        async with httpx.AsyncClient(base_url=service["url"], timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/tight/v1/embeddings", json={"input": texts}) for _ in range(24))
            )

    try:
        responses = asyncio.run(flood())
    finally:
        serve.delete("tight")
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(served) >= 2 and len(refused) >= 10 and len(served) + len(refused) == 24
    for r in refused:  # the router's own refusal (JSON), not Serve's plain-text backpressure 503
        assert r.headers.get("content-type") == "application/json", r.text
        assert r.headers.get("retry-after") == "3" and r.json()["error"]["code"] == "overloaded"
    assert (
        max(r.elapsed.total_seconds() for r in refused) < min(r.elapsed.total_seconds() for r in served) + 5
    )


@pytest.mark.long  # chaos: make test-long
def test_an_input_that_kills_replicas_is_found_and_refused_alone(service, tiny_bge_dir):
    reference = SentenceTransformer(tiny_bge_dir, device="cpu")
    texts = ["Marie Curie", "Pierre Curie", "a volcano erupts", "Warsaw", "Paris", "radium"]
    t0 = time.monotonic()
    resp = httpx.post(f"{service['url']}/v1/embeddings", json={"input": texts, "model": "fatal"}, timeout=180)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 500, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_error" and error["message"].startswith("input[2]: refused"), error
    assert error["index"] == 2 and error["param"] == "input"
    assert elapsed < 120  # split in halves: a few replica restarts, not one per retry forever
    safe = [t for t in texts if "volcano" not in t]
    wait_for(lambda: running_replicas("fatal") == 1, 60, "the replica replaced")
    resp = httpx.post(f"{service['url']}/v1/embeddings", json={"input": safe, "model": "fatal"}, timeout=60)
    assert resp.status_code == 200, resp.text
    got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    assert ((got * reference.encode(safe)).sum(1)).min() >= 0.9999


@pytest.mark.long  # chaos: make test-long
def test_a_replica_whose_device_failed_for_good_is_replaced_through_its_health_check(service, tiny_bge_dir):
    """The first replica the input poisons fails its health check and Serve replaces it; the call waits for
    the replacement (the faulted replica refuses at once, computing nothing), which the input poisons too:
    two replicas lost, so the input is refused, naming it. A fresh replica then serves other texts."""
    from ray import serve

    handle = serve.get_deployment_handle("cursed", "embeddings")
    first = handle.info.remote().result()["replica_id"]
    body = {"input": ["a volcano erupts"], "model": "cursed"}
    resp = httpx.post(f"{service['url']}/v1/embeddings", json=body, timeout=240)
    assert resp.status_code == 500, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_error" and error["message"].startswith("input[0]: refused"), error
    assert "device failed" in error["message"]

    def replaced() -> bool:
        if running_replicas("cursed") != 1:
            return False
        try:
            return handle.info.remote().result(timeout_s=10)["replica_id"] != first
        except Exception:  # noqa: BLE001 - a replica on its way out
            return False

    wait_for(replaced, 120, "a fresh replica in place of the faulted ones")
    reference = SentenceTransformer(tiny_bge_dir, device="cpu")
    body = {"input": ["Marie Curie", "Warsaw"], "model": "cursed"}
    resp = httpx.post(f"{service['url']}/v1/embeddings", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    assert ((got * reference.encode(body["input"])).sum(1)).min() >= 0.9999
