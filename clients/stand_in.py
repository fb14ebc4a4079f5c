"""One line at a pipeline's entry point sends every ``SentenceTransformer(name)`` of the process to the
service:

    import clients; clients.install()   # before or after the pipeline's imports; no-op when unset

``install()`` replaces ``sentence_transformers.SentenceTransformer`` with ``ServiceSentenceTransformer``, and
the same name in every module already imported that took it with ``from sentence_transformers import
SentenceTransformer`` (upstream youtu-graphrag does at import time, the fork's kt_gen inside a function:
both are covered). Constructing it returns the service's client for that model
(``get_embedder``, below).

Model names resolve on the service (names and aliases of the models config). A local path resolves to the
model it holds: a Hugging Face cache snapshot (``.../models--sentence-transformers--all-MiniLM-L6-v2/
snapshots/<hash>``) to ``sentence-transformers/all-MiniLM-L6-v2``, any other directory to its last
component. Loading options that mean nothing remotely (``device``, ``cache_folder``, ``revision``,
``token``, ``trust_remote_code``, ...) are accepted; ``device`` is where ``convert_to_tensor`` results land.
Options that would change the vectors (``prompts``, ``truncate_dim``, ``modules``, ...) raise ``ValueError``:
the models config decides those.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from clients.http import HTTPEmbedder

# SentenceTransformer(...) options that only say how or where to load the model in process.
LOADING_OPTIONS = frozenset(
    {
        "device",
        "cache_folder",
        "trust_remote_code",
        "revision",
        "token",
        "use_auth_token",
        "local_files_only",
        "model_kwargs",
        "tokenizer_kwargs",
        "config_kwargs",
        "model_card_data",
        "backend",
    }
)
_HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+?)(?:[/\\]|$)")
_original: Any = None


def served_name(name_or_path: str) -> str:
    """The name to ask the service for: hub ids and model names as they are, local paths by what they hold."""
    text = str(name_or_path)
    cache = _HF_CACHE_SNAPSHOT.search(text)
    if cache:
        return f"{cache['org']}/{cache['name']}"
    looks_like_path = text.startswith(("/", "~", ".", "\\")) or os.path.isdir(text) or text.count("/") > 1
    if looks_like_path:
        return os.path.basename(os.path.normpath(os.path.expanduser(text)))
    return text


class ServiceSentenceTransformer:
    """Stands in for ``SentenceTransformer``: construction returns the service's client for the model."""

    def __new__(cls, model_name_or_path: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise ValueError(
                "the embedding service's SentenceTransformer stand-in takes the model name and keyword "
                "arguments only"
            )
        changing = sorted(k for k in kwargs if k not in LOADING_OPTIONS)
        if changing:
            raise ValueError(
                f"SentenceTransformer option(s) {', '.join(changing)} would change the vectors; through the "
                "embedding service the models config decides them"
            )
        name = served_name(model_name_or_path) if model_name_or_path is not None else None
        return get_embedder(name, device=kwargs.get("device"))


def get_embedder(model_name: str | None, **kwargs: Any) -> Any:
    """The service's client for ``model_name`` (None: the service's default model), or an in-process
    ``SentenceTransformer`` when ``EMBEDDING_SERVICE`` is unset."""
    service = os.environ.get("EMBEDDING_SERVICE", "").strip()
    if service.startswith("ray://"):
        from clients.serve import ServeEmbedder

        app = os.environ.get("EMBEDDING_APP", "embeddings")
        return ServeEmbedder(model_name, address=service[len("ray://") :] or "auto", app_name=app, **kwargs)
    if service.startswith(("http://", "https://")):
        return HTTPEmbedder(
            model_name, base_url=service, api_key=os.environ.get("EMBEDDING_API_KEY"), **kwargs
        )
    if service:
        raise ValueError(f"EMBEDDING_SERVICE={service!r}: expected ray://<address>, http(s)://<url> or unset")
    return real_sentence_transformer()(model_name, **kwargs)


def real_sentence_transformer() -> Any:
    """The real ``SentenceTransformer`` class, installed or not."""
    import sentence_transformers

    return _original or sentence_transformers.SentenceTransformer


def install() -> bool:
    """Route every ``SentenceTransformer`` of this process to the service named by ``EMBEDDING_SERVICE``.

    Does nothing (and returns False) when ``EMBEDDING_SERVICE`` is unset or empty.
    """
    global _original
    if not os.environ.get("EMBEDDING_SERVICE", "").strip():
        return False
    import sentence_transformers

    if _original is None:
        _original = sentence_transformers.SentenceTransformer
    _replace(_original, ServiceSentenceTransformer)
    return True


def uninstall() -> None:
    """Put the real ``SentenceTransformer`` back everywhere ``install`` replaced it."""
    global _original
    if _original is not None:
        _replace(ServiceSentenceTransformer, _original)
        _original = None


def _replace(old: Any, new: Any) -> None:
    for module in list(sys.modules.values()):
        if getattr(module, "SentenceTransformer", None) is old:
            try:
                module.SentenceTransformer = new
            except (AttributeError, TypeError):  # a module that refuses attributes: nothing to route there
                continue
