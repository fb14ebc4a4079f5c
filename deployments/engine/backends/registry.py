"""How each model family of ``config.FAMILIES`` is loaded, and the checks of its files that run before
anything deploys. A new family is one entry in ``FAMILIES``, one in ``LOADERS`` and its module.

This module imports no model code at import time (the app builder imports it); loaders import their
family's module when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.config import ConfigError, ModelEntry, ModelsConfig, resolve_model_source

if TYPE_CHECKING:
    import torch

    from deployments.engine.backends.base import EmbeddingBackend


@dataclass(frozen=True)
class LoadContext:
    """Where a replica loads a model: the resolved source, whether Ray gave it GPUs, its CPU threads, the
    config's directory (relative paths in an entry are relative to it). The device is picked by the loader:
    a runtime without torch never imports it."""

    source: str
    use_gpu: bool
    threads: int
    base_dir: Path | None

    def torch_device(self) -> torch.device:
        from deployments.engine.backends.base import pick_device

        return pick_device(self.use_gpu)


@dataclass(frozen=True)
class Loader:
    """One family's loader. ``check_files``: problems found with the model's files (its tokenizer) before
    anything is deployed, one line per problem, led by the key."""

    load: Callable[[ModelEntry, LoadContext], EmbeddingBackend]
    check_files: Callable[[ModelEntry, str], list[str]] | None = None


def compile_cache_dir(entry: ModelEntry, base_dir: Path | None) -> Path | None:
    """Where an entry's compiled models are kept (None: not kept); relative paths from the config's folder."""
    if entry.compile_cache_dir is None:
        return None
    path = Path(entry.compile_cache_dir).expanduser()
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def load_sentence_transformers(
    source: str,
    *,
    runtime: str = "torch",
    dtype: str = "float32",
    max_seq_length: int | None = None,
    threads: int = 1,
    cache_dir: Path | None = None,
    fidelity_min_cosine: float = 0.9999,
    trust_remote_code: bool = False,
    device: torch.device | None = None,
) -> EmbeddingBackend:
    """A sentence-transformers model on ``runtime`` (``openvino``: CPU only, ``device`` unused)."""
    options = {
        "dtype": dtype,
        "max_seq_length": max_seq_length,
        "threads": threads,
        "fidelity_min_cosine": fidelity_min_cosine,
        "trust_remote_code": trust_remote_code,
    }
    if runtime == "openvino":
        from deployments.engine.backends.openvino_backend import load_openvino

        return load_openvino(source, cache_dir=cache_dir, **options)
    from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend

    return SentenceTransformersBackend(source, device=device, **options)


def _load_sentence_transformers(entry: ModelEntry, ctx: LoadContext) -> EmbeddingBackend:
    return load_sentence_transformers(
        ctx.source,
        runtime=entry.runtime,
        dtype=entry.dtype,
        max_seq_length=entry.max_seq_length,
        threads=ctx.threads,
        cache_dir=compile_cache_dir(entry, ctx.base_dir),
        fidelity_min_cosine=entry.fidelity_min_cosine,
        trust_remote_code=entry.trust_remote_code,
        device=None if entry.runtime == "openvino" else ctx.torch_device(),  # openvino: CPU placements only
    )


def _load_nvembed(entry: ModelEntry, ctx: LoadContext) -> EmbeddingBackend:
    from deployments.engine.backends.nvembed import NVEmbedBackend

    return NVEmbedBackend.load(
        ctx.source,
        device=ctx.torch_device(),
        dtype=entry.dtype,
        max_seq_length=entry.max_seq_length,
        prompts=entry.prompts,
        threads=ctx.threads,
    )


def _check_nvembed_files(entry: ModelEntry, source: str) -> list[str]:
    """Every NV-Embed prompt must leave at least one token to pool within ``max_seq_length`` (the
    published code returns NaN otherwise)."""
    from deployments.engine.backends.nvembed import (
        TOKENIZER_FILES,
        InstructionLengths,
        load_nvembed_tokenizer,
        local_checkpoint,
    )

    try:
        lengths = InstructionLengths(load_nvembed_tokenizer(local_checkpoint(source, TOKENIZER_FILES)))
    except Exception as exc:  # noqa: BLE001 - reported as a config problem
        return [f"source: cannot load its tokenizer: {exc}"]
    return lengths.check_room(entry.prompts, entry.max_seq_length)


LOADERS: dict[str, Loader] = {
    "sentence-transformers": Loader(_load_sentence_transformers),
    "nvembed": Loader(_load_nvembed, check_files=_check_nvembed_files),
}


def load_backend(
    entry: ModelEntry, *, use_gpu: bool, base_dir: Path | None = None, threads: int = 1
) -> EmbeddingBackend:
    """The entry's model, loaded on this replica's device by its family's loader."""
    ctx = LoadContext(resolve_model_source(entry.source, base_dir), use_gpu, threads, base_dir)
    return LOADERS[entry.backend].load(entry, ctx)


def check_backends(config: ModelsConfig, base_dir: Path | None = None) -> None:
    """The families' checks that need a model's files, run before deploying; raises ConfigError."""
    problems = []
    for i, entry in enumerate(config.models):
        check = LOADERS[entry.backend].check_files
        if check is None:
            continue
        where = f"models[{i}] ({entry.name})"
        try:
            source = resolve_model_source(entry.source, base_dir)
        except FileNotFoundError as exc:
            problems.append(f"{where}.source: {exc}")
            continue
        problems += [f"{where}.{p}" for p in check(entry, source)]
    if problems:
        raise ConfigError(problems)
