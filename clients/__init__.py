"""Drop-in replacements for ``SentenceTransformer(model_name)`` backed by the embedding service.

``get_embedder(model_name)`` picks the transport from ``EMBEDDING_SERVICE``:

- ``ray://auto`` or ``ray://<head>:6379``: join the Ray cluster as a driver, call the router by handle;
- ``http://...`` / ``https://...``: the OpenAI-style HTTP API (``EMBEDDING_API_KEY`` sent as a bearer token);
- unset or empty: an in-process ``SentenceTransformer(model_name)``, as the pipeline does today.

``install()`` does the same for every ``SentenceTransformer(...)`` of the process at once (one line at the
pipeline's entry point; see ``clients/stand_in.py``).

The HTTP client needs numpy and httpx only (``pip install ./clients``: ``clients/pyproject.toml``);
``ServeEmbedder`` needs Ray and the server's modules, so it is imported only when asked for.
"""

from __future__ import annotations

from typing import Any

from clients.embedder import EmbeddingServiceError, RemoteEmbedder
from clients.http import HTTPEmbedder
from clients.stand_in import (
    ServiceSentenceTransformer,
    get_embedder,
    install,
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


def __getattr__(name: str) -> Any:
    if name == "ServeEmbedder":  # Ray and the server's modules: only for the caller who asks
        from clients.serve import ServeEmbedder

        return ServeEmbedder
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
