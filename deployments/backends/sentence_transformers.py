"""sentence-transformers models (bge, e5, mpnet, m3e, MiniLM), computed exactly as ``encode`` does.

Per micro-batch the pipeline is the model's own: its input module tokenises ``prompt + text`` with
truncation at ``max_seq_length``, the model's modules run (transformer, pooling, optional Normalize), and
``sentence_embedding`` is returned. Only the grouping into batches is ours.
"""

from __future__ import annotations

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from deployments.backends.base import EmbeddingBackend, EncodedText, pad_right, torch_dtype
from deployments.errors import input_too_long


class SentenceTransformersBackend(EmbeddingBackend):
    def __init__(
        self,
        source: str,
        *,
        device: torch.device,
        dtype: str = "float32",
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
    ):
        self.device = device
        self.model = SentenceTransformer(source, device=str(device), trust_remote_code=trust_remote_code)
        self.model.to(torch_dtype(dtype, device))
        self.model.eval()
        for module in self.model:
            if getattr(module, "include_prompt", True) is False:
                raise ValueError(f"{source}: pooling with include_prompt=False is not supported")
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.max_seq_length = int(self.model.max_seq_length)
        self.dimension = int(self.model.get_embedding_dimension())
        tokenizer = self.model.tokenizer
        tokenizer.padding_side = "right"  # pooling follows the attention mask; slicing needs right padding
        self._pad_values = {"input_ids": tokenizer.pad_token_id or 0}

    def tokenize(
        self, texts: list[str], prompt: str, truncate: bool = True, first_index: int = 0
    ) -> list[EncodedText]:
        kwargs = {} if truncate else {"processing_kwargs": {"text": {"max_length": self.max_seq_length + 1}}}
        features = self.model.preprocess(texts, prompt=prompt or None, **kwargs)
        lengths = features["attention_mask"].sum(dim=1).tolist()
        if not truncate:
            for i, n in enumerate(lengths):
                if n > self.max_seq_length:
                    raise input_too_long(first_index + i, n, self.max_seq_length)
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        return [EncodedText({k: v[i, :n] for k, v in tensors.items()}, int(n)) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def forward(self, items: list[EncodedText]) -> np.ndarray:
        batch = {k: v.to(self.device) for k, v in pad_right(items, self._pad_values).items()}
        out = self.model(batch)["sentence_embedding"]
        return out.float().cpu().numpy()
