"""``SentenceTransformer.encode`` over the service: the contract the GraphRAG pipeline relies on.

``RemoteEmbedder`` holds everything both transports share: argument handling, cutting a call into
requests the server accepts and sending them in parallel, retries with exponential backoff and jitter
inside a total deadline, and the shapes, dtypes and tensor conversions of ``encode``. A transport only
sends one request and classifies failures.

Requests are sized by the server, not by ``batch_size`` (a GPU-memory knob in process; the server batches
by tokens): at most the server's ``max_inputs_per_request`` inputs and ``max_request_bytes`` of text each,
cut into at least two requests per replica of the model (never below 64 inputs each) so every replica has
work, and up to ``max_concurrency`` (default: two per replica, at least 4) in flight.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.contract import ClientError, check_items, model_not_found

if TYPE_CHECKING:  # torch is imported only where a caller asks for tensors
    import torch

# Text bytes per request: bounds one request's work (and body) whatever the texts' lengths.
MAX_REQUEST_BYTES = 1 << 20
# Below this many inputs a request is not split further for parallelism (hops cost more than they give).
MIN_SPLIT_INPUTS = 64


def plan_requests(
    texts: list[str], max_inputs: int, max_bytes: int = MAX_REQUEST_BYTES, min_requests: int = 1
) -> list[slice]:
    """Consecutive slices of ``texts``: each within ``max_inputs`` and ``max_bytes`` (a longer single text
    travels alone), and at least ``min_requests`` of them when that leaves ``MIN_SPLIT_INPUTS`` each."""
    if not texts:
        return []
    wanted = max(1, min(min_requests, len(texts) // MIN_SPLIT_INPUTS))
    per_request = min(max_inputs, math.ceil(len(texts) / wanted))
    slices, start, size = [], 0, 0
    for i, text in enumerate(texts):
        n = len(text.encode("utf-8", "surrogatepass"))
        if i > start and (i - start >= per_request or size + n > max_bytes):
            slices.append(slice(start, i))
            start, size = i, 0
        size += n
    slices.append(slice(start, len(texts)))
    return slices


class EmbeddingServiceError(RuntimeError):
    """The service could not embed within the deadline (last cause attached)."""


class Retryable(Exception):
    """A failure worth retrying (overload, server fault, lost connection, replica death)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def check_encode_arguments(
    output_value: str | None, precision: str, truncate_dim: int | None, batch_size: int, extra: dict[str, Any]
) -> None:
    """``encode``'s arguments the service cannot honour are refused, never silently ignored."""
    if output_value != "sentence_embedding":
        raise ValueError("only output_value='sentence_embedding' is served")
    if precision != "float32":
        raise ValueError("only precision='float32' is served")
    if truncate_dim is not None:
        raise ValueError("truncate_dim is not supported by the remote embedder")
    if extra:
        raise ValueError(f"unsupported encode() arguments: {', '.join(sorted(extra))}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")


def cosine_similarity(a: Any, b: Any) -> torch.Tensor:
    """Cosine similarity matrix [len(a), len(b)] of two arrays or tensors of vectors."""
    import torch

    a_t = torch.as_tensor(np.asarray(a, dtype=np.float32)) if not isinstance(a, torch.Tensor) else a
    b_t = torch.as_tensor(np.asarray(b, dtype=np.float32)) if not isinstance(b, torch.Tensor) else b
    a_t, b_t = torch.atleast_2d(a_t).float(), torch.atleast_2d(b_t).float()
    a_n = torch.nn.functional.normalize(a_t, p=2, dim=1)
    b_n = torch.nn.functional.normalize(b_t, p=2, dim=1)
    return a_n @ b_n.T


def call_with_retries(fn: Callable[[], Any], deadline: float, deadline_s: float) -> Any:
    """Call ``fn`` until it succeeds, it fails for good, or ``deadline`` (monotonic; ``deadline_s`` after
    the call began) passes: exponential backoff with jitter, at least a server's ``Retry-After``."""
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
                    f"embedding service did not answer within the {deadline_s:.0f} s deadline after "
                    f"{attempt} attempt(s); last error: {exc}"
                ) from exc
            time.sleep(wait)


class RemoteEmbedder(ABC):
    """The parts of ``SentenceTransformer`` the pipeline uses, served remotely.

    Accepted but meaningless remotely: ``device`` only places the returned tensor; ``precision`` other than
    float32, ``output_value`` other than ``sentence_embedding`` and ``truncate_dim`` raise ValueError
    rather than being silently ignored.
    """

    def __init__(
        self,
        model: str | None,
        *,
        deadline_s: float = 300.0,
        max_concurrency: int | None = None,
        device: str | torch.device | None = None,
    ):
        self.deadline_s = deadline_s
        self._device: str | torch.device = device if device is not None else "cpu"
        models = call_with_retries(self._fetch_models, time.monotonic() + deadline_s, deadline_s)
        names: dict[str, dict[str, Any]] = {}
        for info in models:
            for name in [info["id"], *info.get("aliases", [])]:
                names[name] = info
        default = next((m for m in models if m.get("default")), models[0])
        if model is not None and model not in names:
            error = model_not_found(model, sorted(names))
            raise ClientError(f"{error.reason} (asked {self.where()})", error.code, error.param)
        self.model_name = model if model is not None else default["id"]
        self.info = names[self.model_name]
        self.max_seq_length: int = self.info["max_seq_length"]
        self.max_inputs_per_request: int = self.info.get("max_inputs_per_request", 2048)
        # Text bytes per request: within the server's body limit with room for JSON escaping.
        self.max_request_bytes = min(
            MAX_REQUEST_BYTES, self.info.get("max_body_bytes", 2 * MAX_REQUEST_BYTES) // 2
        )
        self.replicas: int = self.info.get("max_replicas", 1)
        self.max_concurrency = max_concurrency or max(4, 2 * self.replicas)

    # ---- transport ---------------------------------------------------------------------------------
    @abstractmethod
    def where(self) -> str:
        """The service this client talks to, for messages."""

    @abstractmethod
    def _fetch_models(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _embed_chunk(
        self, texts: list[str], prompt_name: str | None, normalize: bool, timeout: float
    ) -> np.ndarray:
        """float32 [len(texts), dim]; raise Retryable for what is worth retrying, anything else is final."""

    # ---- the sentence-transformers surface ---------------------------------------------------------
    def get_embedding_dimension(self) -> int:
        if self.info.get("dimension") is None:  # the model was pending when this client was made
            models = call_with_retries(
                self._fetch_models, time.monotonic() + self.deadline_s, self.deadline_s
            )
            self.info = next((m for m in models if m["id"] == self.info["id"]), self.info)
            if self.info.get("dimension") is None:
                state = self.info.get("state")
                raise EmbeddingServiceError(f"model {self.model_name!r} is not ready: {state}")
        return int(self.info["dimension"])

    get_sentence_embedding_dimension = get_embedding_dimension

    def get_max_seq_length(self) -> int:
        return self.max_seq_length

    @property
    def device(self) -> torch.device:
        """Where ``convert_to_tensor`` results land (the model itself runs on the server)."""
        import torch

        return torch.device(self._device)

    def to(self, device: str | torch.device) -> RemoteEmbedder:
        self._device = device
        return self

    def eval(self) -> RemoteEmbedder:
        return self

    @property
    def tokenizer(self) -> Any:
        raise AttributeError(
            "the remote embedder has no tokenizer: the model and its tokenizer run on the embedding service "
            "(max_seq_length says where it truncates)"
        )

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.info.get("prompts", {}))

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)], as sentence-transformers' default ``similarity``."""
        return cosine_similarity(a, b)

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
        check_encode_arguments(output_value, precision, truncate_dim, batch_size, kwargs)
        prompt_name = self._prompt_name(prompt_name, prompt)
        single = isinstance(sentences, str)
        if single:
            texts = [sentences]
        elif isinstance(sentences, (list, tuple, np.ndarray)):
            texts = list(sentences)
        else:
            raise ClientError(
                f"'input' must be a string or a list of strings, got {type(sentences).__name__}",
                param="input",
            )
        check_items(texts)  # the server's own check, on the whole list: errors name the caller's index
        vectors = self._embed_all(texts, prompt_name, normalize_embeddings, bool(show_progress_bar))
        if convert_to_numpy and not convert_to_tensor:
            return vectors[0] if single else vectors
        import torch  # only a caller that asks for tensors needs torch installed

        if convert_to_tensor:
            out: Any = torch.from_numpy(vectors).to(device or self._device)
            return out[0] if single else out
        rows = [torch.from_numpy(v) for v in vectors]
        return rows[0] if single else rows

    def encode_query(self, sentences: str | list[str], **kwargs: Any) -> Any:
        """``encode`` with the model's ``query`` prompt, when it has one (sentence-transformers 5)."""
        kwargs.setdefault("prompt_name", "query" if "query" in self.prompts else None)
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | list[str], **kwargs: Any) -> Any:
        """``encode`` with the model's ``document``, ``passage`` or ``corpus`` prompt, when it has one."""
        name = next((n for n in ("document", "passage", "corpus") if n in self.prompts), None)
        kwargs.setdefault("prompt_name", name)
        return self.encode(sentences, **kwargs)

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
        self, texts: list[str], prompt_name: str | None, normalize: bool, progress: bool
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.get_embedding_dimension()), dtype=np.float32)
        slices = plan_requests(
            texts, self.max_inputs_per_request, self.max_request_bytes, min_requests=2 * self.replicas
        )
        deadline = time.monotonic() + self.deadline_s
        bar = None
        if progress:
            from tqdm.autonotebook import tqdm

            bar = tqdm(total=len(texts), desc="Embedding", unit="text")

        def run(part: slice) -> np.ndarray:
            chunk = texts[part]

            def send() -> np.ndarray:
                return self._embed_chunk(chunk, prompt_name, normalize, max(0.1, deadline - time.monotonic()))

            try:
                result = call_with_retries(send, deadline, self.deadline_s)
            except ClientError as error:  # placed in this request: place it in the caller's list
                raise error.after(part.start) from None
            if bar is not None:
                bar.update(len(chunk))
            return result

        try:
            if len(slices) == 1:
                parts = [run(slices[0])]
            else:
                with ThreadPoolExecutor(min(self.max_concurrency, len(slices))) as pool:
                    parts = list(pool.map(run, slices))
        finally:
            if bar is not None:
                bar.close()
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
