"""A sentence-transformers module that ends its own process when a batch holds a given token: an input
that takes down the replica serving it (as a crashing kernel or an out-of-memory kill would), made
deterministic for tests. ``build_fatal_bge`` puts it in front of the tiny bge."""

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


def build_fatal_bge(tiny_bge_dir: str, path: Path, token: str = "volcano") -> str:
    """The tiny bge behind an ``ExitOnToken`` for ``token``: any text holding it kills the process."""
    from sentence_transformers import SentenceTransformer

    if (path / "modules.json").exists():
        return str(path)
    base = SentenceTransformer(tiny_bge_dir, device="cpu")
    token_id = base.tokenizer.convert_tokens_to_ids(token)
    assert token_id != base.tokenizer.unk_token_id, token
    model = SentenceTransformer(modules=[base[0], ExitOnToken(token_id), *list(base)[1:]], device="cpu")
    shutil.rmtree(path, ignore_errors=True)
    model.save(str(path))
    return str(path)
