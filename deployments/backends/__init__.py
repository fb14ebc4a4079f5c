"""Model families, one module each; ``load_backend`` builds the one a models-config entry names."""

from __future__ import annotations

from pathlib import Path

from deployments.backends.base import EmbeddingBackend, pick_device
from deployments.config import ModelEntry, resolve_model_source


def load_backend(entry: ModelEntry, *, use_gpu: bool, base_dir: Path | None = None) -> EmbeddingBackend:
    device = pick_device(use_gpu)
    source = resolve_model_source(entry.source, base_dir)
    if entry.backend == "sentence-transformers":
        from deployments.backends.sentence_transformers import SentenceTransformersBackend

        return SentenceTransformersBackend(
            source,
            device=device,
            dtype=entry.dtype,
            max_seq_length=entry.max_seq_length,
            trust_remote_code=entry.trust_remote_code,
        )
    raise ValueError(f"unknown backend {entry.backend!r}")
