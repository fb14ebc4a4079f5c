"""Sentence-transformers modules that fail the way a device does when a batch holds a given token, made
deterministic for tests: ``ExitOnToken`` ends its own process (a crashing kernel, an out-of-memory kill;
``build_fatal_bge``), ``PoisonOnToken`` raises the error CUDA gives once its context is poisoned (an illegal
memory access; ``build_poisoned_context_bge``). Each goes in front of the tiny bge."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from sentence_transformers.sentence_transformer.modules import Module

EXIT_CODE = 17


class ExitOnToken(Module):
    config_keys = ["token_id"]

    def __init__(self, token_id: int):
        super().__init__()
        self.token_id = token_id

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        if bool((features["input_ids"] == self.token_id).any()):
            os._exit(EXIT_CODE)
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.save_config(output_path)


# What torch raises (torch.AcceleratorError, a RuntimeError) after an illegal memory access on CUDA.
POISONED_CONTEXT = (
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
    "reported at some other API call, so the stacktrace below might be incorrect."
)


class PoisonOnToken(ExitOnToken):
    """Raises the poisoned-context CUDA error whenever a batch holds ``token_id``."""

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        if bool((features["input_ids"] == self.token_id).any()):
            raise getattr(torch, "AcceleratorError", RuntimeError)(POISONED_CONTEXT)
        return features


def _build_with(module_class: type[ExitOnToken], tiny_bge_dir: str, path: Path, token: str) -> str:
    from sentence_transformers import SentenceTransformer

    if (path / "modules.json").exists():
        return str(path)
    base = SentenceTransformer(tiny_bge_dir, device="cpu")
    token_id = base.tokenizer.convert_tokens_to_ids(token)
    assert token_id != base.tokenizer.unk_token_id, token
    model = SentenceTransformer(modules=[base[0], module_class(token_id), *list(base)[1:]], device="cpu")
    shutil.rmtree(path, ignore_errors=True)
    model.save(str(path))
    return str(path)


def build_fatal_bge(tiny_bge_dir: str, path: Path, token: str = "volcano") -> str:
    """The tiny bge behind an ``ExitOnToken`` for ``token``: any text holding it kills the process."""
    return _build_with(ExitOnToken, tiny_bge_dir, path, token)


def build_poisoned_context_bge(tiny_bge_dir: str, path: Path, token: str = "volcano") -> str:
    """The tiny bge behind a ``PoisonOnToken`` for ``token``: any text holding it poisons the "device"."""
    return _build_with(PoisonOnToken, tiny_bge_dir, path, token)
