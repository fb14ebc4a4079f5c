"""Request parsing and response rendering of the OpenAI wire format (no server needed)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from deployments.ingress.openai_api import (
    check_dimensions,
    parse_embeddings_request,
    render_embeddings,
    shorten,
)
from deployments.protocol.errors import ClientError


def parse(body) -> object:
    return parse_embeddings_request(body if isinstance(body, bytes) else orjson.dumps(body), max_inputs=4)


def test_valid_requests():
    assert parse({"input": "hi"}).texts == ["hi"]
    req = parse(
        {
            "input": ["a", ""],
            "model": "m",
            "encoding_format": "base64",
            "dimensions": 8,
            "user": "u",
            "prompt_name": "query",
            "normalize": False,
            "truncate": False,
        }
    )
    assert (req.texts, req.model, req.dimensions, req.normalize, req.truncate) == (
        ["a", ""],
        "m",
        8,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "must be a JSON object"),
        ({}, 400, "'input' is required"),
        ({"input": []}, 400, "empty list"),
        ({"input": [1, 2, 3]}, 400, "token arrays are not supported"),
        ({"input": [[1, 2], [3]]}, 400, "token arrays are not supported"),
        ({"input": ["a", None]}, 400, "input[1]: must be a string, got NoneType"),
        ({"input": 5.5}, 400, "must be a string or a list of strings"),
        ({"input": ["a"] * 5}, 413, "at most 4"),
        ({"input": "a", "encoding_format": "int8"}, 400, "'encoding_format' must be"),
        ({"input": "a", "dimensions": 0}, 400, "'dimensions' must be at least 1"),
        ({"input": "a", "dimensions": True}, 400, "'dimensions' must be an integer"),
        ({"input": "a", "normalize": "yes"}, 400, "'normalize' must be a boolean"),
        ({"input": "a", "inputs": "b"}, 400, "unknown field(s) inputs"),
        ({"input": "a", "model": 3}, 400, "'model' must be a string"),
    ],
)
def test_bad_requests_name_the_problem(body, status, fragment):
    with pytest.raises(ClientError) as info:
        parse(body)
    assert info.value.status == status
    assert fragment in info.value.message


def test_render_float_and_base64_round_trip():
    vectors = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    body = orjson.loads(render_embeddings(vectors, "m", 7, "float"))
    assert body["object"] == "list" and body["model"] == "m"
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in body["data"]] == [0, 1]
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], dtype=np.float32), vectors)
    b64 = orjson.loads(render_embeddings(vectors, "m", 7, "base64"))
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]])
    np.testing.assert_array_equal(decoded, vectors)


def test_shorten_keeps_leading_dimensions_and_renormalises():
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(shorten(v, 2, 3, normalize=True), [[0.6, 0.8]])
    np.testing.assert_allclose(shorten(v, 2, 3, normalize=False), [[3.0, 4.0]])
    assert shorten(v, None, 3, True) is v


def test_dimensions_only_where_the_model_was_trained_for_them():
    check_dimensions(384, 384, "m", False)  # the model's own width: always
    check_dimensions(16, 384, "m", True)
    check_dimensions(256, 1024, "m", [256, 512])
    with pytest.raises(ClientError, match="more than this model gives") as err:
        check_dimensions(385, 384, "m", True)
    assert (err.value.status, err.value.param) == (400, "dimensions")
    with pytest.raises(ClientError, match="model 'm' was not trained for truncated vectors") as err:
        check_dimensions(128, 384, "m", False)
    assert "'matryoshka'" in str(err.value) and err.value.param == "dimensions"
    with pytest.raises(ClientError, match="truncated vectors of 256, 512, 1024 only"):
        check_dimensions(300, 1024, "m", [256, 512])


@pytest.mark.parametrize("tokens", [[101, 2023, 102], [[101, 2023], [102]]])
def test_token_ids_are_refused_with_the_way_to_turn_them_off_in_langchain(tokens):
    """LangChain's OpenAIEmbeddings sends tiktoken ids unless told not to; the 400 says how."""
    with pytest.raises(ClientError) as info:
        parse({"input": tokens})
    error = info.value
    assert (error.status, error.code, error.param) == (400, "token_ids_not_supported", "input")
    assert "OpenAIEmbeddings" in error.message and "check_embedding_ctx_length=False" in error.message
