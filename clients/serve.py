"""``ServeEmbedder``: the sentence-transformers surface over a Ray Serve handle, from any Python process."""

from __future__ import annotations

from typing import Any

import numpy as np

from clients.embedder import RemoteEmbedder, Retryable
from deployments.errors import ClientError


class ServeEmbedder(RemoteEmbedder):
    def __init__(
        self,
        model: str | None = None,
        *,
        app_name: str = "embeddings",
        address: str = "auto",
        deadline_s: float = 300.0,
        max_concurrency: int = 4,
    ):
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self._handle = serve.get_app_handle(app_name)
        super().__init__(model, deadline_s=deadline_s, max_concurrency=max_concurrency)

    def _result(self, response: Any, timeout: float) -> Any:
        try:
            return response.result(timeout_s=timeout)
        except ClientError:
            raise  # the caller's mistake: never retried
        except Exception as exc:  # noqa: BLE001 - replica death, overload, timeout: embedding is idempotent
            raise Retryable(f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def _fetch_models(self) -> list[dict[str, Any]]:
        return self._result(self._handle.models.remote(), 60.0)

    def _embed_chunk(
        self, texts: list[str], prompt_name: str | None, normalize: bool, timeout: float
    ) -> np.ndarray:
        response = self._handle.embed.remote(
            texts, model=self.model_name, prompt_name=prompt_name, normalize=normalize
        )
        return self._result(response, timeout)
