"""Metrics through Ray's real Prometheus endpoint after real traffic: counters moved by the right amounts."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from tests.conftest import (
    free_port,
    model_entry,
    models_config,
    serve_app,
    start_private_ray,
    write_models_config,
)

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    metrics_port = free_port()
    start_private_ray(
        tmp_path_factory,
        {"KEYS": "k1"},
        num_cpus=2,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    folder = tmp_path_factory.mktemp("metrics")
    cache = {"max_mb": 1, "disk_gb": 0.01, "disk_dir": str(folder / "vectors")}  # memory, then disk
    config = models_config(model_entry(MODEL, cache=cache), router={"api_keys_env": "KEYS"})
    url = serve_app(write_models_config(folder / "models.yaml", config))
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


def scrape(url: str) -> dict[str, float]:
    """Prometheus text: ``name{labels}`` -> value (labels kept as text)."""
    samples = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    pattern = re.compile(rf"^(ray_)?{name}(\{{|$)")
    out = 0.0
    for key, value in samples.items():
        if pattern.match(key) and all(f'{k}="{v}"' in key for k, v in labels.items()):
            out += value
    return out


def test_counters_move_by_what_the_traffic_did(service):
    base, metrics_url = service
    auth = {"Authorization": "Bearer k1"}
    for n in (3, 5, 7):
        resp = httpx.post(
            f"{base}/v1/embeddings", json={"input": [f"text {i}" for i in range(n)]}, headers=auth
        )
        assert resp.status_code == 200
    assert httpx.post(f"{base}/v1/embeddings", json={"input": []}, headers=auth).status_code == 400
    assert httpx.post(f"{base}/v1/embeddings", json={"input": ["x"]}).status_code == 401

    # the cache: "text 0".."text 2" are computed once, then answered from it (3 + 5 hits)
    wanted = {
        ("embeddings_inputs_total", ()): 7,
        ("embeddings_cache_lookups_total", (("result", "hit"), ("model", MODEL))): 8,
        ("embeddings_cache_lookups_total", (("result", "miss"), ("model", MODEL))): 7,
        ("embeddings_cache_evictions_total", ()): 0,
        # the disk store sees only what memory missed: the 7 new texts, each once
        ("embeddings_disk_cache_lookups_total", (("result", "miss"), ("model", MODEL))): 7,
        ("embeddings_disk_cache_lookups_total", (("result", "hit"), ("model", MODEL))): 0,
        ("embeddings_requests_total", (("status", "200"), ("route", "/v1/embeddings"))): 3,
        ("embeddings_requests_total", (("status", "400"),)): 1,
        ("embeddings_requests_total", (("status", "401"),)): 1,
        ("embeddings_auth_failures_total", (("route", "/v1/embeddings"),)): 1,
        # histograms are reported on their own schedule: waited for like the counters. Their _sum is not
        # exact in Ray's export (built from bucket midpoints: passes of 3, 2, 2 rows read 6), _count is.
        ("embeddings_batch_rows_count", (("model", MODEL),)): 3,
        ("embeddings_queue_wait_seconds_count", (("model", MODEL),)): 3,
    }
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(metrics_url)
        got = {key: total(samples, key[0], **dict(key[1])) for key in wanted}
        if got == wanted or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == wanted, got
    real = total(samples, "embeddings_tokens_total", kind="real", model=MODEL)
    padded = total(samples, "embeddings_tokens_total", kind="padded", model=MODEL)
    assert 7 * 3 <= real <= padded  # every input is at least [CLS] text i [SEP]
    assert 0 < total(samples, "embeddings_cache_bytes", model=MODEL) <= 7 * (384 * 4 + 260)
    deadline = time.monotonic() + 30  # the store's size is set after its write, behind the answers
    while total(samples, "embeddings_disk_cache_bytes", model=MODEL) < 7 * 384 * 4:
        assert time.monotonic() < deadline, "the disk cache's bytes were never reported"
        time.sleep(1)
        samples = scrape(metrics_url)
    assert total(samples, "embeddings_forward_seconds_count", model=MODEL) >= 1
    assert total(samples, "embeddings_queue_depth", model=MODEL, unit="inputs") == 0
    assert total(samples, "embeddings_dropped_inputs_total", model=MODEL) == 0


def test_a_client_that_hangs_up_mid_body_is_counted_as_leaving_not_as_a_server_fault(service):
    """Whether the router sees the hang-up in the body stream or Serve's proxy cancels the request first
    (a race), it counts as 499 and never as a 500."""
    base, metrics_url = service
    host, port = base.removeprefix("http://").split(":")
    closed = {"status": "499", "route": "/v1/embeddings"}
    before = scrape(metrics_url)
    for _ in range(3):  # 100 bytes promised, 11 sent, then gone
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"input": ['
            )
            time.sleep(0.3)
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(metrics_url)
        left = total(samples, "embeddings_requests_total", **closed) - total(
            before, "embeddings_requests_total", **closed
        )
        if left >= 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert left == 3
    assert total(samples, "embeddings_requests_total", status="500") == 0
