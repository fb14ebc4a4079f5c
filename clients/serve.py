"""``ServeEmbedder``: the sentence-transformers surface over a Ray Serve handle, from any Python process.

It joins the Ray cluster as a quiet driver (no worker logs or connection banners in the caller's output),
then checks that the cluster it reached serves the application and the model it was asked for, naming
the cluster when it does not: ``address="auto"`` picks whatever cluster this machine last started, which
need not be the one running the service (``serve run`` does not record its cluster there).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import numpy as np
import torch
from ray.exceptions import RayTaskError

from clients.embedder import EmbeddingServiceError, RemoteEmbedder, Retryable
from deployments.engine.device_faults import DeviceFault
from deployments.protocol.errors import ClientError, ShuttingDown, original_error


def unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why ``host:port`` cannot be reached (None when it can): ``ray.init`` would wait minutes instead."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None  # "auto", a ray:// client URL...: left to ray.init
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def plain_client_error(error: ClientError) -> ClientError:
    """The server's ClientError without Ray's wrapper and remote traceback."""
    original = original_error(error)
    if not isinstance(original, ClientError):
        original = error
    return ClientError(original.reason, original.code, original.param, original.status, original.index)


class ServeEmbedder(RemoteEmbedder):
    def __init__(
        self,
        model: str | None = None,
        *,
        app_name: str = "embeddings",
        address: str = "auto",
        deadline_s: float = 300.0,
        max_concurrency: int | None = None,
        device: str | torch.device | None = None,
    ):
        import ray
        from ray import serve

        if ray.is_initialized():
            joined = ray.get_runtime_context().gcs_address
            if address not in (None, "", "auto") and address != joined:
                raise EmbeddingServiceError(
                    f"this process is already connected to the Ray cluster at {joined}; it cannot also join "
                    f"{address!r}"
                )
        else:
            why = unreachable(address)
            try:
                if why is not None:
                    raise ConnectionError(why)
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as exc:
                raise EmbeddingServiceError(
                    f"no Ray cluster at address {address!r} ({exc}); name the cluster that runs the service, "
                    "e.g. EMBEDDING_SERVICE=ray://<head-ip>:6379"
                ) from None
        self.cluster = ray.get_runtime_context().gcs_address
        self.app_name = app_name
        apps = self._served_apps()
        if app_name not in apps:
            raise EmbeddingServiceError(
                f"the Ray cluster at {self.cluster} serves no application {app_name!r} (it serves: "
                f"{', '.join(sorted(apps)) or 'nothing'}); name the cluster that runs the service, e.g. "
                "EMBEDDING_SERVICE=ray://<head-ip>:6379, and the app with EMBEDDING_APP"
            )
        self._handle = serve.get_app_handle(app_name)
        super().__init__(model, deadline_s=deadline_s, max_concurrency=max_concurrency, device=device)

    @staticmethod
    def _served_apps() -> list[str]:
        from ray import serve

        try:
            return list(serve.status().applications)
        except Exception:  # noqa: BLE001 - no Serve on this cluster at all
            return []

    def where(self) -> str:
        return f"application {self.app_name!r} on the Ray cluster at {self.cluster}"

    def _result(self, response: Any, timeout: float) -> Any:
        try:
            return response.result(timeout_s=timeout)
        except ClientError as error:  # the caller's mistake: never retried, raised as the server said it
            raise plain_client_error(error) from None
        except RayTaskError as error:  # a server fault the same call would meet again (a model fault...)
            cause = original_error(error)
            # That replica's GPU failed for good, or the service is stopping: another replica (or the
            # service once restarted) answers it.
            if isinstance(cause, (DeviceFault, ShuttingDown)):
                raise Retryable(f"{type(cause).__name__}: {str(cause)[:300]}") from None
            raise EmbeddingServiceError(f"the service failed: {type(cause).__name__}: {cause}") from None
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
