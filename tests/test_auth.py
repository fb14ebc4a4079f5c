"""API keys: the router's check (real Ray, real HTTP, real MiniLM), the clients sending keys, and the rule
that an app listening beyond loopback without keys does not start."""

from __future__ import annotations

import httpx
import pytest

from clients import HTTPEmbedder, get_embedder
from deployments.ingress.auth import ApiKeys, exposure_problem
from tests.conftest import (
    model_entry,
    models_config,
    serve_app,
    start_private_ray,
    write_models_config,
)

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

KEYS_ENV = "TEST_EMBEDDING_API_KEYS"


def test_keys_are_checked_whole_and_any_listed_key_is_accepted():
    keys = ApiKeys(["old-key", "new-key"])
    assert (
        keys.accepts("Bearer old-key") and keys.accepts("Bearer new-key") and keys.accepts("bearer new-key")
    )
    for wrong in (None, "", "Bearer", "Bearer old", "Bearer old-key2", "Basic old-key", "old-key"):
        assert not keys.accepts(wrong), wrong


def test_keys_come_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv(KEYS_ENV, " a-key , b-key ,")
    assert ApiKeys.from_env(KEYS_ENV).accepts("Bearer b-key")
    monkeypatch.setenv(KEYS_ENV, " , ")
    with pytest.raises(RuntimeError, match=f"{KEYS_ENV}.*unset or empty"):
        ApiKeys.from_env(KEYS_ENV)


def test_listening_beyond_loopback_needs_keys_or_an_explicit_yes():
    assert exposure_problem("127.0.0.1", authenticated=False, allow_unauthenticated=False) is None
    assert exposure_problem("0.0.0.0", authenticated=True, allow_unauthenticated=False) is None
    assert exposure_problem("0.0.0.0", authenticated=False, allow_unauthenticated=True) is None
    problem = exposure_problem("0.0.0.0", authenticated=False, allow_unauthenticated=False)
    assert problem and "listens on '0.0.0.0'" in problem and "router.api_keys_env" in problem


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory):
    import ray
    from ray import serve

    start_private_ray(tmp_path_factory, {KEYS_ENV: "old-key,new-key"}, num_cpus=2)
    config = models_config(model_entry(), router={"api_keys_env": KEYS_ENV})
    yield serve_app(write_models_config(tmp_path_factory.mktemp("auth") / "models.yaml", config))
    serve.shutdown()
    ray.shutdown()


def test_a_missing_or_wrong_key_is_a_401_that_says_nothing_more(keyed_service):
    body = {"input": ["Marie Curie"]}
    answers = [
        httpx.post(f"{keyed_service}/v1/embeddings", json=body, headers=headers)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic old-key"})
    ]
    for resp in answers:
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert resp.json() == answers[0].json()  # no hint of which part was wrong
    assert answers[0].json()["error"]["code"] == "invalid_api_key"
    for key in ("old-key", "new-key"):  # two keys: one can be rotated out while the next already works
        ok = httpx.post(
            f"{keyed_service}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384
    assert httpx.get(f"{keyed_service}/v1/models").status_code == 401
    assert httpx.get(f"{keyed_service}/health").status_code == 200  # open, for load balancers


def test_the_clients_send_the_key_and_the_handle_needs_none(keyed_service, monkeypatch):
    from ray import serve

    assert HTTPEmbedder(base_url=keyed_service, api_key="new-key").encode("Warsaw").shape == (384,)
    with pytest.raises(ValueError, match="invalid or missing API key"):
        HTTPEmbedder(base_url=keyed_service)
    monkeypatch.setenv("EMBEDDING_SERVICE", keyed_service)
    monkeypatch.setenv("EMBEDDING_API_KEY", "old-key")
    assert get_embedder("all-MiniLM-L6-v2").encode(["a", "b"]).shape == (2, 384)
    vectors = serve.get_app_handle("embeddings").embed.remote(["inside the cluster"]).result()
    assert vectors.shape == (1, 384)
