"""``HTTPEmbedder``: the sentence-transformers surface over ``POST /v1/embeddings``."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from clients.contract import ClientError, error_kind
from clients.embedder import EmbeddingServiceError, RemoteEmbedder, Retryable

if TYPE_CHECKING:
    import torch

# The service's own errors are retried as its table says (overloaded, timeout: clients/contract.py); a
# 500 from it is a fault the same request would meet again (model_error: the model fails on an input).
# What answers from in front of the service (a proxy, a gateway: no JSON error) is retried on overload and
# gateway statuses, and on a plain 500 (Serve's HAProxy ingress answers a replica lost mid-request, a 502,
# as a plain-text 500).
GATEWAY_RETRY_STATUSES = {429, 500, 502, 503, 504}


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class HTTPEmbedder(RemoteEmbedder):
    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        deadline_s: float = 300.0,
        max_concurrency: int | None = None,
        device: str | torch.device | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, limits=limits)
        super().__init__(model, deadline_s=deadline_s, max_concurrency=max_concurrency, device=device)

    def where(self) -> str:
        return self.base_url

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> Any:
        try:
            resp = self._client.request(method, path, timeout=timeout or self.timeout, **kwargs)
        except httpx.TransportError as exc:  # refused, reset, timed out: the server may come back
            raise Retryable(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code < 400:
            return resp.json()
        status = resp.status_code
        try:
            error, ours = resp.json()["error"], True
        except (ValueError, KeyError, TypeError):
            error, ours = {"message": resp.text[:300]}, False
        code = str(error.get("code"))
        if error_kind(code, status).retry if ours else status in GATEWAY_RETRY_STATUSES:
            raise Retryable(
                f"HTTP {status}: {error.get('message')}", _retry_after(resp.headers.get("Retry-After"))
            )
        if status >= 500:
            raise EmbeddingServiceError(f"HTTP {status} ({code}): {error.get('message')}")
        # the caller's mistake, raised as the server said it (a ClientError is a ValueError)
        index = error.get("index")
        if isinstance(index, int):  # the reason without the "input[i]: " the message leads with
            reason = str(error.get("message")).removeprefix(f"input[{index}]: ")
            raise ClientError(reason, code, error.get("param"), status, index)
        raise ClientError(str(error.get("message")), code, error.get("param"), status)

    def _fetch_models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["data"]

    def _embed_chunk(
        self, texts: list[str], prompt_name: str | None, normalize: bool, timeout: float
    ) -> np.ndarray:
        body: dict[str, Any] = {
            "input": texts,
            "model": self.model_name,
            "normalize": normalize,
            "encoding_format": "base64",  # exact float32, a third of the bytes of JSON floats
        }
        if prompt_name is not None:
            body["prompt_name"] = prompt_name
        data = self._request("POST", "/v1/embeddings", json=body, timeout=min(self.timeout, timeout))["data"]
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
