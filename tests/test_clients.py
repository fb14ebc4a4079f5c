"""The kt_gen drop-in clients against a real service: the encode contract, and behaviour under faults."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from clients import EmbeddingServiceError, HTTPEmbedder, ServeEmbedder, get_embedder
from deployments.protocol.errors import ClientError
from tests.conftest import (
    MINILM_DIR,
    REPO,
    assert_same,
    deploy_app,
    free_port,
    model_entry,
    models_config,
    serve_app,
    write_models_config,
)

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

MODEL = "all-MiniLM-L6-v2"
PROMPTS = {"query": "query: ", "passage": ""}
TEXTS = ["Marie Curie", "", "Warsaw is the capital of Poland", "radioactivity research in Paris laboratories"]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    entry = model_entry(MODEL, aliases=["semantic_dedup"], max_seq_length=256, prompts=PROMPTS)
    return serve_app(
        write_models_config(tmp_path_factory.mktemp("clients") / "models.yaml", models_config(entry))
    )


@pytest.fixture(scope="module")
def reference():
    return SentenceTransformer(MINILM_DIR, device="cpu", prompts=PROMPTS)


def call_patterns(e) -> dict:
    """Every way the pipeline (kt_gen, tree_comm, retrievers) calls a SentenceTransformer."""
    many = [f"entity {i}: {t}" for i in range(10) for t in TEXTS]
    return {
        "str": e.encode("Marie Curie"),
        "list": e.encode(TEXTS),
        "batch_size": e.encode(many, batch_size=7),
        "progress_bar": e.encode(many, batch_size=16, show_progress_bar=True),
        "tensor": e.encode(TEXTS, convert_to_tensor=True, batch_size=128),
        "tensor_device": e.encode(TEXTS, convert_to_tensor=True, device="cpu"),
        "normalized": e.encode(TEXTS, normalize_embeddings=True),
        "prompt_name": e.encode(TEXTS, prompt_name="query"),
        "prompt": e.encode(TEXTS, prompt="query: "),
        "tensor_list": e.encode(TEXTS, convert_to_numpy=False),
        "str_tensor": e.encode("Warsaw", convert_to_tensor=True),
        "dimension": e.get_sentence_embedding_dimension(),
        "dimension_new": e.get_embedding_dimension(),
        "max_seq_length": e.max_seq_length,
        "similarity": e.similarity(e.encode(TEXTS[:2]), e.encode(TEXTS)),
    }


@pytest.mark.parametrize("transport", ["serve", "http"])
def test_contract_matches_in_process_sentence_transformers(service, reference, transport):
    client = ServeEmbedder(MODEL) if transport == "serve" else HTTPEmbedder(MODEL, base_url=service)
    expected = call_patterns(reference)
    got = call_patterns(client)
    for key in expected:
        assert_same(got[key], expected[key], key)
    empty = client.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_a_separate_driver_process_gets_the_same_vectors(service, reference, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    script = (
        "import json, sys; from clients import ServeEmbedder; "
        f"e = ServeEmbedder({MODEL!r}, address={address!r}); "
        f"print(json.dumps(e.encode({TEXTS!r}, normalize_embeddings=True).tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180, check=True
    ).stdout
    got = np.array(json.loads(out.strip().splitlines()[-1]), dtype=np.float32)
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert ((got * expected).sum(1)).min() >= 0.9999


@pytest.mark.parametrize("transport", ["serve", "http"])
def test_unknown_model_is_an_immediate_clear_error(service, transport):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"available: all-MiniLM-L6-v2, semantic_dedup"):
        ServeEmbedder("gpt-4") if transport == "serve" else HTTPEmbedder("gpt-4", base_url=service)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("transport", ["serve", "http"])
def test_client_mistakes_are_not_retried(service, transport):
    client = ServeEmbedder(MODEL) if transport == "serve" else HTTPEmbedder(MODEL, base_url=service)
    t0 = time.monotonic()
    with pytest.raises(ClientError, match="prompt_name 'document' is not defined"):
        client.encode(TEXTS, prompt_name="document")
    assert time.monotonic() - t0 < 2
    with pytest.raises(ValueError, match="not configured"):
        client.encode(TEXTS, prompt="summarize: ")


class FlakyProxy:
    """A real HTTP server in front of the service: its first ``failures`` POSTs get ``status`` with
    ``payload`` (default: 503 + Retry-After and an OpenAI-style error)."""

    OVERLOADED = b'{"error": {"message": "overloaded", "type": "server_error"}}'

    def __init__(
        self, upstream: str, failures: int, retry_after: float, status: int = 503, payload: bytes = OVERLOADED
    ):
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method: str, body: bytes | None = None):
                resp = httpx.request(
                    method,
                    upstream + self.path,
                    content=body,
                    timeout=60,
                    headers={"content-type": "application/json"},
                )
                self.send_response(resp.status_code)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(resp.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.attempts += 1
                if outer.attempts <= failures:
                    self.send_response(status)
                    self.send_header("Retry-After", str(retry_after))
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._forward("POST", body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_http_retries_503_honouring_retry_after(service, reference):
    proxy = FlakyProxy(service, failures=2, retry_after=1.0)
    try:
        client = HTTPEmbedder(MODEL, base_url=proxy.url)
        t0 = time.monotonic()
        got = client.encode(TEXTS)
        elapsed = time.monotonic() - t0
    finally:
        proxy.close()
    assert proxy.attempts == 3
    assert elapsed >= 2.0  # two Retry-After: 1 waits
    assert_same(got, reference.encode(TEXTS), "after retries")


@pytest.mark.parametrize(
    ("payload", "retried"),
    [
        (b"Internal Server Error", True),  # a gateway's (HAProxy's normalised 502): the service never saw it
        (b'{"error": {"message": "model failed", "type": "server_error", "code": "model_error"}}', False),
    ],
)
def test_http_retries_a_500_only_when_it_is_not_the_service_s_own(service, reference, payload, retried):
    proxy = FlakyProxy(service, failures=1, retry_after=0.1, status=500, payload=payload)
    try:
        client = HTTPEmbedder(MODEL, base_url=proxy.url)
        if retried:
            assert_same(client.encode(TEXTS), reference.encode(TEXTS), "after a gateway's 500")
        else:
            with pytest.raises(EmbeddingServiceError, match="model_error"):
                client.encode(TEXTS)
    finally:
        proxy.close()
    assert proxy.attempts == (2 if retried else 1)


def test_a_stopped_server_gives_a_clear_error_after_the_deadline():
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(EmbeddingServiceError, match="did not answer within the 3 s deadline"):
        HTTPEmbedder(MODEL, base_url=f"http://127.0.0.1:{port}", deadline_s=3)
    assert time.monotonic() - t0 < 6


@pytest.mark.long  # chaos: make test-long
def test_encode_survives_a_replica_killed_midway(service, reference, ray_session):
    ray = ray_session
    texts = [f"{i} knowledge tree community summary " * 8 for i in range(600)]
    client = ServeEmbedder(MODEL, deadline_s=240)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{MODEL}#" in a["name"]]
    assert len(replicas) == 1, replicas

    def kill_soon():
        time.sleep(1.0)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    got = client.encode(texts, batch_size=8)
    killer.join()
    after = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{MODEL}#" in a["name"]]
    assert replicas[0]["name"] not in after  # the replica really died and Serve replaced it
    assert_same(got, reference.encode(texts), "across a replica death")


def test_get_embedder_follows_the_environment(service, monkeypatch):
    monkeypatch.setenv("EMBEDDING_SERVICE", service)
    assert isinstance(get_embedder("semantic_dedup"), HTTPEmbedder)
    monkeypatch.setenv("EMBEDDING_SERVICE", "ray://auto")
    assert isinstance(get_embedder(MODEL), ServeEmbedder)
    monkeypatch.delenv("EMBEDDING_SERVICE")
    assert isinstance(get_embedder(MINILM_DIR), SentenceTransformer)
    monkeypatch.setenv("EMBEDDING_SERVICE", "grpc://x")
    with pytest.raises(ValueError, match="expected ray://"):
        get_embedder(MODEL)


class RefusingProxy(FlakyProxy):
    """Forwards everything, except that a POST whose inputs hold ``marker`` is refused as the service
    refuses an input: a 400 naming the marker's place in that request's ``input``."""

    def __init__(self, upstream: str, marker: str):
        super().__init__(upstream, failures=0, retry_after=0)
        forward_post = self.server.RequestHandlerClass.do_POST

        def do_post(handler):
            body = handler.rfile.read(int(handler.headers["content-length"]))
            texts = json.loads(body)["input"]
            if marker not in texts:
                handler.rfile = io.BytesIO(body)
                return forward_post(handler)
            index = texts.index(marker)
            error = {"message": f"input[{index}]: refused", "type": "invalid_request_error",
                     "param": "input", "code": "invalid_request", "index": index}  # fmt: skip
            payload = json.dumps({"error": error}).encode()
            handler.send_response(400)
            handler.send_header("content-length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)

        self.server.RequestHandlerClass.do_POST = do_post


def test_a_refused_input_is_named_by_its_place_in_the_callers_list(service):
    """The client cuts a call into requests; the server names an input by its place in its request, and
    the client re-places it in the caller's list."""
    proxy = RefusingProxy(service, marker="the refused one")
    texts = [f"entity {i}" for i in range(300)]
    texts[250] = "the refused one"
    try:
        client = HTTPEmbedder(MODEL, base_url=proxy.url)
        with pytest.raises(ClientError) as refused:
            client.encode(texts)
    finally:
        proxy.close()
    assert refused.value.index == 250 and str(refused.value) == "input[250]: refused"


CLIENT_ALONE = """
import json, sys
from clients import HTTPEmbedder
client = HTTPEmbedder({model!r}, base_url={url!r})
vectors = client.encode({texts!r}, normalize_embeddings=True)
try:
    client.encode(["fine", 7])
    refused = None
except ValueError as error:
    refused = [type(error).__name__, error.index, str(error)]
heavy = ("ray", "torch", "transformers", "sentence_transformers", "openvino", "deployments")
print(json.dumps({{"vectors": vectors.tolist(), "refused": refused,
                  "imported": [m for m in heavy if m in sys.modules]}}))
"""


def test_the_client_installs_and_runs_alone(service, reference, tmp_path):
    """A fresh virtualenv with only the client distribution (clients/pyproject.toml): numpy and httpx
    come with it; Ray, torch, transformers, sentence-transformers and OpenVINO neither come nor load."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO / "clients", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
    ).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert {"numpy", "httpx", "graphrag-embeddings-client"} <= names
    assert not names & {"ray", "torch", "transformers", "sentence-transformers", "openvino"}, names
    script = CLIENT_ALONE.format(model=MODEL, url=service, texts=TEXTS)
    out = subprocess.run(
        [python, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["imported"] == []
    assert result["refused"] == ["ClientError", 1, "input[1]: must be a string, got int"]
    got = np.array(result["vectors"], dtype=np.float32)
    assert ((got * reference.encode(TEXTS, normalize_embeddings=True)).sum(1)).min() >= 0.9999


def test_a_draining_router_is_retried_by_both_clients_not_failed(service, tmp_path):
    """A router replica draining before its service stops (deployments/tools/serve_run.py) refuses new
    work with shutting_down; both clients retry it (another replica, or the service once restarted,
    answers) until their deadline, rather than failing it at once as a server fault."""
    from ray import serve

    config = write_models_config(
        tmp_path / "models.yaml", models_config(model_entry(MODEL, max_seq_length=256))
    )
    deploy_app(config, name="draining", route_prefix="/draining")
    try:
        over_http = HTTPEmbedder(MODEL, base_url=f"{service}/draining", deadline_s=3)
        by_handle = ServeEmbedder(MODEL, app_name="draining", deadline_s=3)
        assert over_http.encode(["Marie Curie"]).shape == (1, 384)
        assert serve.get_app_handle("draining").drain.remote().result(timeout_s=60)["left"] == 0
        for client in (over_http, by_handle):  # retried (2 attempts or more) until the deadline
            with pytest.raises(EmbeddingServiceError, match=r"after [2-9]\d* attempt\(s\); .*shutting down"):
                client.encode(["Marie Curie"])
        health = httpx.get(f"{service}/draining/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        assert httpx.post(f"{service}/v1/embeddings", json={"input": ["x"]}, timeout=30).status_code == 200
    finally:
        serve.delete("draining")
