"""The OpenAI embeddings wire format: request parsing with precise 4xx errors, response rendering.

Plain functions over bytes and arrays (no web framework), because both directions are on the hot path:
parsing is one ``orjson.loads`` plus type checks, rendering serialises the float32 rows directly.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from deployments.protocol.errors import ClientError, check_items, error_kind
from deployments.protocol.vectors import l2_normalize

if TYPE_CHECKING:
    from deployments.config import ModelEntry, ModelsConfig

KNOWN_FIELDS = frozenset(
    {"input", "model", "encoding_format", "dimensions", "user", "prompt_name", "normalize", "truncate"}
)


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    prompt_name: str | None = None
    normalize: bool | None = None
    truncate: bool = True


def _optional(body: dict, key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ClientError(f"'{key}' must be {what}, got {type(value).__name__}", param=key)
    return value


def validate_texts(value: Any, max_inputs: int) -> list[str]:
    """``input`` as a list of strings: a string or a non-empty list of strings, at most ``max_inputs``."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ClientError(
            f"'input' must be a string or a list of strings, got {type(value).__name__}", param="input"
        )
    if not value:
        raise ClientError("'input' is an empty list; send at least one string", param="input")
    if len(value) > max_inputs:
        raise ClientError(
            f"'input' has {len(value)} items; at most {max_inputs} are accepted per request",
            "too_many_inputs",
            "input",
        )
    check_items(value)
    return value


def parse_embeddings_request(body: bytes, max_inputs: int) -> EmbeddingsRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ClientError(f"request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        raise ClientError(
            f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(KNOWN_FIELDS))}",
            param=unknown[0],
        )
    if "input" not in data:
        raise ClientError("'input' is required", param="input")
    texts = validate_texts(data["input"], max_inputs)
    encoding_format = _optional(data, "encoding_format", str, "a string") or "float"
    if encoding_format not in ("float", "base64"):
        raise ClientError(
            f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}", param="encoding_format"
        )
    dimensions = _optional(data, "dimensions", int, "an integer")
    if dimensions is not None and dimensions < 1:
        raise ClientError(f"'dimensions' must be at least 1, got {dimensions}", param="dimensions")
    _optional(data, "user", str, "a string")
    truncate = _optional(data, "truncate", bool, "a boolean")
    return EmbeddingsRequest(
        texts=texts,
        model=_optional(data, "model", str, "a string"),
        encoding_format=encoding_format,
        dimensions=dimensions,
        prompt_name=_optional(data, "prompt_name", str, "a string"),
        normalize=_optional(data, "normalize", bool, "a boolean"),
        truncate=True if truncate is None else truncate,
    )


def check_dimensions(dimensions: int, native: int, model: str, matryoshka: bool | list[int]) -> None:
    """A request's ``dimensions`` is the model's width, or a size the model was trained to be cut to
    (its models-config key ``matryoshka``): the first components of any other model's vector are a
    silently degraded embedding, so they are refused, as OpenAI, vLLM and SGLang do."""
    if dimensions > native:
        raise ClientError(
            f"'dimensions' {dimensions} is more than this model gives ({native})",
            "dimensions_not_supported",
            "dimensions",
        )
    if dimensions == native or matryoshka is True:
        return
    if matryoshka and dimensions in matryoshka:
        return
    if matryoshka:
        sizes = ", ".join(str(d) for d in sorted({*matryoshka, native}))
        raise ClientError(
            f"'dimensions' {dimensions}: model {model!r} was trained for truncated vectors of {sizes} only "
            "(its models-config key 'matryoshka')",
            "dimensions_not_supported",
            "dimensions",
        )
    raise ClientError(
        f"'dimensions' {dimensions}: model {model!r} was not trained for truncated vectors (Matryoshka), so "
        f"its first {dimensions} components are not an embedding; omit 'dimensions' (it gives {native}), "
        "or set the models-config key 'matryoshka' for a model trained for them",
        "dimensions_not_supported",
        "dimensions",
    )


def shorten(vectors: np.ndarray, dimensions: int | None, native: int, normalize: bool) -> np.ndarray:
    """Keep the first ``dimensions`` components (checked by ``check_dimensions``), renormalised when
    asked."""
    if dimensions is None or dimensions == native:
        return vectors
    out = vectors[:, :dimensions]
    if normalize:
        out = l2_normalize(out)
    return np.ascontiguousarray(out, dtype=np.float32)


def render_embeddings(vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: str) -> bytes:
    if encoding_format == "base64":
        rows: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        rows = list(vectors)
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def render_error(
    code: str, message: str, param: str | None = None, status: int = 500, index: int | None = None
) -> bytes:
    """An error in OpenAI's shape; its ``type`` from ``code``'s entry in
    ``deployments.protocol.errors.ERRORS`` (``status`` decides it for a code the table lacks). ``index``: the
    failing input's place in the request's ``input`` list, for an error about one input (a field beside
    OpenAI's four)."""
    kind = error_kind(code, status).type
    error = {"message": message, "type": kind, "param": param, "code": code}
    if index is not None:
        error["index"] = index
    return orjson.dumps({"error": error})


# What a replica's info() says computes its passes, repeated in /v1/models.
SERVING_KEYS = (
    "runtime",
    "precision",
    "fidelity_worst_cosine",
    "serving_note",
    "allocator",
    "forward_overhead_tokens",
    "forward_overhead_source",
)


def model_card(
    entry: ModelEntry, info: dict[str, Any] | None, config: ModelsConfig, pending_because: str
) -> dict[str, Any]:
    """One model in ``/v1/models``: names, prompts (name -> text), dimension (None while its replicas are
    pending), what computes it, and the limits clients size and parallelise their requests from."""
    return {
        "id": entry.name,
        "object": "model",
        "created": 0,
        "owned_by": "graphrag-embeddings",
        "aliases": list(entry.aliases),
        "prompts": dict(entry.prompts),
        "default_prompt": entry.default_prompt,
        "dimension": info["dimension"] if info else None,
        "state": "ready" if info else f"pending: {pending_because}",
        # What computes the vectors (one replica's report; all replicas of a model load alike).
        **{k: info.get(k) if info else None for k in SERVING_KEYS},
        "max_seq_length": entry.max_seq_length,
        "max_inputs_per_request": config.router.max_inputs_per_request,
        "max_body_bytes": config.max_body_bytes,
        "max_replicas": entry.max_replicas,
        "default": entry.name == config.name_table()[config.default_model],
    }
