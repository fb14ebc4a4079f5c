"""``SentenceTransformer.encode`` over the service: the contract the GraphRAG pipeline relies on.

``RemoteEmbedder`` holds everything both transports share: argument handling, client-side chunking with
bounded concurrency, retries with exponential backoff and jitter inside a total deadline, and the shapes,
dtypes and tensor conversions of ``encode``. A transport only sends one chunk and classifies failures.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch


class EmbeddingServiceError(RuntimeError):
    """The service could not embed within the deadline (last cause attached)."""


class Retryable(Exception):
    """A failure worth retrying (overload, server fault, lost connection, replica death)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RemoteEmbedder(ABC):
    """The parts of ``SentenceTransformer`` the pipeline uses, served remotely.

    Accepted but meaningless remotely: ``device`` only places the returned tensor; ``precision`` other than
    float32, ``output_value`` other than ``sentence_embedding`` and ``truncate_dim`` raise ValueError
    rather than being silently ignored.
    """

    def __init__(self, model: str | None, *, deadline_s: float = 300.0, max_concurrency: int = 4):
        self.deadline_s = deadline_s
        self.max_concurrency = max_concurrency
        models = self._call_with_retries(self._fetch_models, time.monotonic() + deadline_s)
        names: dict[str, dict[str, Any]] = {}
        for info in models:
            for name in [info["id"], *info.get("aliases", [])]:
                names[name] = info
        default = next((m for m in models if m.get("default")), models[0])
        if model is not None and model not in names:
            raise ValueError(f"model {model!r} is not served; available: {', '.join(sorted(names))}")
        self.model_name = model if model is not None else default["id"]
        self.info = names[self.model_name]
        self.max_seq_length: int = self.info["max_seq_length"]

    # ---- transport ---------------------------------------------------------------------------------
    @abstractmethod
    def _fetch_models(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _embed_chunk(
        self, texts: list[str], prompt_name: str | None, normalize: bool, timeout: float
    ) -> np.ndarray:
        """float32 [len(texts), dim]; raise Retryable for what is worth retrying, anything else is final."""

    # ---- the sentence-transformers surface ---------------------------------------------------------
    def get_embedding_dimension(self) -> int:
        return int(self.info["dimension"])

    get_sentence_embedding_dimension = get_embedding_dimension

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.info.get("prompts", {}))

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)], as sentence-transformers' default ``similarity``."""
        a_t = torch.as_tensor(np.asarray(a, dtype=np.float32)) if not isinstance(a, torch.Tensor) else a
        b_t = torch.as_tensor(np.asarray(b, dtype=np.float32)) if not isinstance(b, torch.Tensor) else b
        a_t, b_t = torch.atleast_2d(a_t).float(), torch.atleast_2d(b_t).float()
        a_n = torch.nn.functional.normalize(a_t, p=2, dim=1)
        b_n = torch.nn.functional.normalize(b_t, p=2, dim=1)
        return a_n @ b_n.T

    def encode(
        self,
        sentences: str | list[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        if output_value != "sentence_embedding":
            raise ValueError("only output_value='sentence_embedding' is served")
        if precision != "float32":
            raise ValueError("only precision='float32' is served")
        if truncate_dim is not None:
            raise ValueError("truncate_dim is not supported by the remote embedder")
        if kwargs:
            raise ValueError(f"unsupported encode() arguments: {', '.join(sorted(kwargs))}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        prompt_name = self._prompt_name(prompt_name, prompt)
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        vectors = self._embed_all(
            texts, prompt_name, normalize_embeddings, batch_size, bool(show_progress_bar)
        )
        if convert_to_tensor:
            out: Any = torch.from_numpy(vectors).to(device or "cpu")
            return out[0] if single else out
        if not convert_to_numpy:
            rows = [torch.from_numpy(v) for v in vectors]
            return rows[0] if single else rows
        return vectors[0] if single else vectors

    # ---- internals ---------------------------------------------------------------------------------
    def _prompt_name(self, prompt_name: str | None, prompt: str | None) -> str | None:
        """A literal ``prompt`` must be one of the model's configured prompts (sent by name), since the
        service applies instructions server-side (NV-Embed masks them out of pooling)."""
        if prompt is None:
            return prompt_name
        for name, text in self.prompts.items():
            if text == prompt:
                return name
        raise ValueError(
            f"prompt {prompt!r} is not configured for model {self.model_name!r}; configured prompts: "
            f"{self.prompts or 'none'} (use prompt_name, or add it to the models config)"
        )

    def _embed_all(
        self, texts: list[str], prompt_name: str | None, normalize: bool, batch_size: int, progress: bool
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.get_embedding_dimension()), dtype=np.float32)
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        deadline = time.monotonic() + self.deadline_s
        bar = None
        if progress:
            from tqdm.autonotebook import tqdm

            bar = tqdm(total=len(chunks), desc="Batches")

        def run(chunk: list[str]) -> np.ndarray:
            def send() -> np.ndarray:
                return self._embed_chunk(chunk, prompt_name, normalize, max(0.1, deadline - time.monotonic()))

            result = self._call_with_retries(send, deadline)
            if bar is not None:
                bar.update(1)
            return result

        try:
            if len(chunks) == 1:
                parts = [run(chunks[0])]
            else:
                with ThreadPoolExecutor(min(self.max_concurrency, len(chunks))) as pool:
                    parts = list(pool.map(run, chunks))
        finally:
            if bar is not None:
                bar.close()
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def _call_with_retries(self, fn: Callable[[], Any], deadline: float) -> Any:
        """Call ``fn`` until it succeeds, it fails for good, or the deadline passes (backoff with jitter)."""
        attempt = 0
        while True:
            try:
                return fn()
            except Retryable as exc:
                attempt += 1
                backoff = min(8.0, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                wait = max(backoff, exc.retry_after or 0.0)
                if time.monotonic() + wait >= deadline:
                    raise EmbeddingServiceError(
                        f"embedding service did not answer within the {self.deadline_s:.0f} s deadline after "
                        f"{attempt} attempt(s); last error: {exc}"
                    ) from exc
                time.sleep(wait)
