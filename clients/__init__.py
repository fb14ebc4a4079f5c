"""Drop-in replacements for ``SentenceTransformer(model_name)`` backed by the embedding service.

``get_embedder(model_name)`` picks the transport from ``EMBEDDING_SERVICE``:

- ``ray://auto`` or ``ray://<head>:6379``: join the Ray cluster as a driver, call the router by handle;
- ``http://...`` / ``https://...``: the OpenAI-style HTTP API (``EMBEDDING_API_KEY`` sent as a bearer token);
- unset or empty: an in-process ``SentenceTransformer(model_name)``, as the pipeline does today.

``install()`` does the same for every ``SentenceTransformer(...)`` of the process at once (one line at the
pipeline's entry point; see ``clients/stand_in.py``).
"""

from __future__ import annotations

import os
from typing import Any

from clients.embedder import EmbeddingServiceError, RemoteEmbedder
from clients.http import HTTPEmbedder
from clients.serve import ServeEmbedder
from clients.stand_in import (
    ServiceSentenceTransformer,
    install,
    real_sentence_transformer,
    served_name,
    uninstall,
)

__all__ = [
    "EmbeddingServiceError",
    "HTTPEmbedder",
    "RemoteEmbedder",
    "ServeEmbedder",
    "ServiceSentenceTransformer",
    "get_embedder",
    "install",
    "served_name",
    "uninstall",
]


def get_embedder(model_name: str | None, **kwargs: Any) -> Any:
    """The service's client for ``model_name`` (None: the service's default model), or an in-process
    ``SentenceTransformer`` when ``EMBEDDING_SERVICE`` is unset."""
    service = os.environ.get("EMBEDDING_SERVICE", "").strip()
    if service.startswith("ray://"):
        app = os.environ.get("EMBEDDING_APP", "embeddings")
        return ServeEmbedder(model_name, address=service[len("ray://") :] or "auto", app_name=app, **kwargs)
    if service.startswith(("http://", "https://")):
        return HTTPEmbedder(
            model_name, base_url=service, api_key=os.environ.get("EMBEDDING_API_KEY"), **kwargs
        )
    if service:
        raise ValueError(f"EMBEDDING_SERVICE={service!r}: expected ray://<address>, http(s)://<url> or unset")
    return real_sentence_transformer()(model_name, **kwargs)
