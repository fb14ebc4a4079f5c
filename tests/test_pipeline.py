"""youtu-graphrag's embedding call sites under the one-line switch, over HTTP and over the Ray handle.

Each call site of upstream (tree_comm, faiss_filter, enhanced_kt_retriever) and of the fork (semantic dedup)
runs as the pipeline's code would, first with the real ``SentenceTransformer``, then after
``clients.install()``: same types, shapes, dtypes, values (cosine >= 0.9999), same clusters. Also: the
sentence-transformers error contract, quiet and checked cluster connection, and request sizing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import sentence_transformers
import torch

import clients
from clients import EmbeddingServiceError, HTTPEmbedder, RemoteEmbedder, ServeEmbedder
from clients.embedder import plan_requests
from deployments.protocol.errors import ClientError
from examples.kt_gen_semantic_dedup import DESCRIPTIONS, THRESHOLD, cluster_candidate_tails, dedup_embedder
from examples.tree_comm_communities import COMMUNITIES, TRIPLES, communities, triple_embeddings
from tests import pipeline_shapes as shapes
from tests.conftest import (
    MINILM_DIR,
    REPO,
    assert_same,
    free_port,
    model_entry,
    models_config,
    serve_app,
    write_models_config,
)

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

REAL_ST = sentence_transformers.SentenceTransformer
MODEL = "all-MiniLM-L6-v2"
HF_CACHE_SNAPSHOT = (
    "~/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/c9745ed1"
)
NODES = [
    f"{name} is a node of the knowledge tree about {topic}" for name in DESCRIPTIONS[:8] for topic in "ab"
]
QUERIES = ["Who discovered radium?", "capital of Poland"]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, tiny_bge_dir, poisoned_bge_dir) -> str:
    aliases = ["sentence-transformers/all-MiniLM-L6-v2", "tree_comm", "semantic_dedup"]
    minilm = model_entry(MODEL, aliases=aliases, max_seq_length=256, prompts={"query": "query: "})
    bge = model_entry("bge-tiny", tiny_bge_dir, aliases=["BAAI/bge-large-en-v1.5"], max_seq_length=512)
    poisoned = {**bge, "name": "poisoned", "aliases": [], "source": poisoned_bge_dir}
    path = tmp_path_factory.mktemp("pipeline") / "models.yaml"
    return serve_app(write_models_config(path, models_config(minilm, bge, poisoned)))


def run_call_sites(minilm: str, tree_comm: str, dedup: str, fallback: str, bge: str) -> dict:
    """Every embedding call of the pipeline, with the model names its config would hold."""
    faiss = shapes.FaissFilterShape(minilm)
    index = faiss.index_vectors(NODES)
    kt = shapes.KTRetrieverShape(None, fallback=fallback)  # no embeddings.model_name: the hard-coded fallback
    tree = sentence_transformers.SentenceTransformer(tree_comm)  # tree_comm's module-level name, at call time
    triples = triple_embeddings(tree, TRIPLES)
    return {
        "faiss.model": faiss.model,
        "faiss.dim": faiss.model_dim,
        "faiss.nodes": faiss.node_embeddings(NODES),
        "faiss.one": faiss.one_node(NODES[0]),
        "faiss.index": index,
        "faiss.search": [faiss.search(index, q, 3) for q in QUERIES],
        "faiss.bge_dim": shapes.FaissFilterShape(bge).model_dim,  # the 384-d projection trap
        "kt.query": kt.query_embedding(QUERIES[0]),
        "kt.nodes": kt.node_embeddings(NODES, batch_size=5),
        "tree.single": tree.encode(TRIPLES[0]),
        "tree.rows": triples,
        "tree.communities": communities(triples, COMMUNITIES),
        "dedup.clusters": cluster_candidate_tails(dedup_embedder(dedup), DESCRIPTIONS, THRESHOLD),
    }


@pytest.fixture(scope="module")
def in_process(tiny_bge_dir) -> dict:
    assert shapes.SentenceTransformer is REAL_ST  # nothing installed yet
    return run_call_sites(MINILM_DIR, MINILM_DIR, MINILM_DIR, MINILM_DIR, tiny_bge_dir)


@pytest.fixture(params=["http", "ray"])
def switched(request, service, in_process, monkeypatch):
    """The one line at the entry point, with EMBEDDING_SERVICE naming the service explicitly."""
    import ray

    where = service if request.param == "http" else f"ray://{ray.get_runtime_context().gcs_address}"
    monkeypatch.setenv("EMBEDDING_SERVICE", where)
    assert clients.install() is True
    yield request.param
    clients.uninstall()


def test_every_call_site_of_upstream_and_the_fork_matches_in_process(switched, in_process):
    # names as the pipeline's config and code hold them: an alias, a HF cache path, a hard-coded name
    got = run_call_sites(
        MODEL, HF_CACHE_SNAPSHOT, "semantic_dedup", "all-MiniLM-L6-v2", "BAAI/bge-large-en-v1.5"
    )
    assert isinstance(got.pop("faiss.model"), RemoteEmbedder)  # the module-level import was reached
    assert isinstance(in_process["faiss.model"], REAL_ST)
    for key, expected in in_process.items():
        if key != "faiss.model":
            assert_same(got[key], expected, key)
    assert got["faiss.dim"] == 384 and got["faiss.bge_dim"] == 32
    assert any(len(c) > 1 for c in got["dedup.clusters"])  # the threshold really merged something


def test_install_does_nothing_without_a_service_and_uninstall_restores(monkeypatch, service):
    monkeypatch.delenv("EMBEDDING_SERVICE", raising=False)
    assert clients.install() is False
    assert sentence_transformers.SentenceTransformer is REAL_ST and shapes.SentenceTransformer is REAL_ST
    monkeypatch.setenv("EMBEDDING_SERVICE", service)
    assert clients.install() is True
    try:
        assert sentence_transformers.SentenceTransformer is clients.ServiceSentenceTransformer
        assert shapes.SentenceTransformer is clients.ServiceSentenceTransformer
    finally:
        clients.uninstall()
    assert sentence_transformers.SentenceTransformer is REAL_ST and shapes.SentenceTransformer is REAL_ST


def test_the_stand_in_covers_what_the_pipeline_touches(switched):
    model = sentence_transformers.SentenceTransformer(MODEL, device="cpu", cache_folder="/tmp/unused")
    assert model.device == torch.device("cpu") and model.to("cpu") is model and model.eval() is model
    assert model.encode(QUERIES, convert_to_tensor=True).device == model.device
    assert model.get_max_seq_length() == model.max_seq_length == 256
    with pytest.raises(AttributeError, match="no tokenizer"):
        model.tokenizer  # noqa: B018
    query = model.encode_query(QUERIES[0])
    assert float(query @ model.encode(QUERIES[0], prompt_name="query")) >= 0.9999
    with pytest.raises(ValueError, match="truncate_dim would change the vectors"):
        sentence_transformers.SentenceTransformer(MODEL, truncate_dim=64)
    with pytest.raises(ValueError, match="'gpt-4' does not exist; available: .*tree_comm"):
        sentence_transformers.SentenceTransformer("gpt-4")


@pytest.mark.parametrize("transport", ["http", "ray"])
def test_client_mistakes_are_value_errors_with_the_servers_message(service, transport):
    client = HTTPEmbedder(MODEL, base_url=service) if transport == "http" else ServeEmbedder(MODEL)
    with pytest.raises(ValueError) as in_process_error:
        REAL_ST(MINILM_DIR).encode(["fine", None])  # what the pipeline's except clauses are written for
    assert in_process_error.type is ValueError
    with pytest.raises(ValueError) as error:
        client.encode(["fine", None])
    assert type(error.value) is ClientError and str(error.value) == "input[1]: must be a string, got NoneType"
    with pytest.raises(ValueError) as error:
        client.encode(None)
    assert str(error.value) == "'input' must be a string or a list of strings, got NoneType"
    with pytest.raises(ValueError) as error:  # found by the server, raised without Ray's wrapper
        client.encode(QUERIES, prompt_name="document")
    assert type(error.value) is ClientError and error.value.status == 400
    assert str(error.value).startswith("prompt_name 'document' is not defined for model")
    assert "Traceback" not in str(error.value)


def test_the_server_does_not_log_handle_client_mistakes_as_errors(service, ray_session):
    from ray import serve

    router = serve.get_app_handle("embeddings")
    with pytest.raises(ClientError):
        router.embed.remote(QUERIES, model=MODEL, prompt_name="no-such-prompt").result()
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path()) / "serve"

    def router_log() -> str:
        return "".join(p.read_text() for p in logs.glob("replica_embeddings_EmbeddingRouter_*.log"))

    deadline = time.monotonic() + 10
    while "no-such-prompt" not in router_log() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in router_log().splitlines() if "no-such-prompt" in line]
    assert lines and all(line.startswith("INFO ") and "client error (400)" in line for line in lines), lines
    assert "Traceback" not in router_log()


def test_a_cluster_without_the_app_is_named(service, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    with pytest.raises(EmbeddingServiceError) as error:
        ServeEmbedder(MODEL, app_name="graphrag")
    assert address in str(error.value) and "serves no application 'graphrag' (it serves: embeddings)" in str(
        error.value
    )


def test_a_driver_is_quiet_and_a_missing_cluster_is_named(service, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    nowhere = f"127.0.0.1:{free_port()}"
    script = (
        "from clients import EmbeddingServiceError, ServeEmbedder\n"
        f"print(ServeEmbedder({MODEL!r}, address={address!r}).encode('Marie Curie').shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EMBEDDING_SERVICE")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "(384,)\n"
    assert "Connecting to existing Ray cluster" not in out.stderr and "(pid=" not in out.stderr, out.stderr
    script = f"from clients import ServeEmbedder\nServeEmbedder({MODEL!r}, address={nowhere!r})\n"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode != 0 and f"no Ray cluster at address '{nowhere}'" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("transport", ["http", "ray"])
def test_a_faiss_sized_encode_is_a_few_server_sized_requests(service, transport, capsys):
    from ray import serve

    from benchmarks.common import kt_gen_mix

    texts = kt_gen_mix(1248, seed=7)
    client = HTTPEmbedder(MODEL, base_url=service) if transport == "http" else ServeEmbedder(MODEL)
    stats = serve.get_deployment_handle(MODEL, "embeddings").stats
    before = stats.remote().result()["calls"]
    vectors = client.encode(texts, show_progress_bar=True)  # default batch_size (32)
    calls = stats.remote().result()["calls"] - before
    assert vectors.shape == (1248, 384) and vectors.flags.writeable and vectors.flags.c_contiguous
    assert calls == 2, calls  # two requests (one replica: two in flight), not 39 batch_size chunks
    assert "1248/1248" in capsys.readouterr().err  # the progress bar counts inputs
    reference = REAL_ST(MINILM_DIR).encode(texts[:50] + texts[-50:])
    got = np.concatenate([vectors[:50], vectors[-50:]])
    assert (
        (got * reference).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
    ).min() >= 0.9999


def test_requests_are_planned_by_the_servers_limits():
    texts = ["x" * 10] * 1000
    assert [s.stop - s.start for s in plan_requests(texts, 2048)] == [1000]
    assert [s.stop - s.start for s in plan_requests(texts, 300)] == [300, 300, 300, 100]
    assert [s.stop - s.start for s in plan_requests(texts, 2048, min_requests=4)] == [250] * 4
    assert [s.stop - s.start for s in plan_requests(texts[:100], 2048, min_requests=4)] == [100]  # >= 64 each
    assert [s.stop - s.start for s in plan_requests(texts, 2048, max_bytes=2500)] == [250] * 4
    mixed = ["a", "é" * 600, "b", "c"]  # 1200 bytes: travels alone over a 1000-byte cap
    assert [(s.start, s.stop) for s in plan_requests(mixed, 10, max_bytes=1000)] == [(0, 1), (1, 2), (2, 4)]
    assert plan_requests([], 10) == []


@pytest.mark.parametrize("transport", ["http", "ray"])
def test_a_model_fault_is_a_500_model_error_and_is_not_retried(service, transport):
    from ray import serve

    stats = serve.get_deployment_handle("poisoned", "embeddings").stats
    resp = httpx.post(
        f"{service}/v1/embeddings", json={"input": ["fine", "a poison pill"], "model": "poisoned"}
    )
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "model_error"
    assert resp.json()["error"]["message"] == "the model produced non-finite values"
    fine = httpx.post(f"{service}/v1/embeddings", json={"input": ["fine"], "model": "poisoned"})
    assert fine.status_code == 200  # the fault is the input's, not the model's
    client = HTTPEmbedder("poisoned", base_url=service) if transport == "http" else ServeEmbedder("poisoned")
    before = stats.remote().result()["calls"]
    t0 = time.monotonic()
    with pytest.raises(EmbeddingServiceError, match="non-finite values"):
        client.encode(["poison"])
    assert time.monotonic() - t0 < 2 and stats.remote().result()["calls"] - before == 1  # sent once
