"""Model families, one module each; ``load_backend`` builds the one a models-config entry names."""

from __future__ import annotations

from pathlib import Path

from deployments.backends.base import EmbeddingBackend, pick_device
from deployments.config import ConfigError, ModelEntry, ModelsConfig, resolve_model_source


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
    if entry.backend == "nvembed":
        from deployments.backends.nvembed import NVEmbedBackend

        return NVEmbedBackend.load(
            source,
            device=device,
            dtype=entry.dtype,
            max_seq_length=entry.max_seq_length,
            prompts=entry.prompts,
        )
    raise ValueError(f"unknown backend {entry.backend!r}")


def check_backends(config: ModelsConfig, base_dir: Path | None = None) -> None:
    """Checks that need a model's tokenizer, run before deploying: every NV-Embed prompt must leave at
    least one token to pool within ``max_seq_length`` (the published code returns NaN otherwise)."""
    problems = []
    for i, entry in enumerate(config.models):
        if entry.backend != "nvembed":
            continue
        from deployments.backends.nvembed import (
            TOKENIZER_FILES,
            InstructionLengths,
            load_nvembed_tokenizer,
            local_checkpoint,
        )

        where = f"models[{i}] ({entry.name})"
        try:
            path = local_checkpoint(resolve_model_source(entry.source, base_dir), TOKENIZER_FILES)
            lengths = InstructionLengths(load_nvembed_tokenizer(path))
        except Exception as exc:  # noqa: BLE001 - reported as a config problem
            problems.append(f"{where}.source: cannot load its tokenizer: {exc}")
            continue
        problems += [f"{where}.{p}" for p in lengths.check_room(entry.prompts, entry.max_seq_length)]
    if problems:
        raise ConfigError(problems)
