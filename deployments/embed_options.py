"""What a model call takes and gives, the same types in every layer.

``EmbedOptions``: how a request's texts are embedded, resolved once per request from what it asks and its
model's config. The same frozen object is the coalescer's key, part of the cache key and the model call's
argument, so an option added here reaches every layer without being renamed on the way.

``EmbedResult``: what comes back, from the engine through the model deployment, the coalescer (which
slices a merged call's result per request), the cache (which fills in what it held) and the router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deployments.errors import ClientError

if TYPE_CHECKING:
    from deployments.config import ModelEntry


@dataclass(frozen=True)
class EmbedOptions:
    prompt: str = ""  # the instruction's text, prepended to every input
    normalize: bool = True  # L2-normalise the vectors
    truncate: bool = True  # cut inputs past max_seq_length (False: refuse them with a 400)


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dimension]
    token_counts: np.ndarray  # int32 [n]: tokens each input took, special tokens included
    queue_seconds: float = 0.0  # admission to the call's first forward pass
    compute_seconds: float = 0.0  # its first forward pass to its last

    def rows(self, start: int, end: int) -> EmbedResult:
        """The result of inputs ``start:end`` of the call (a merged call's share for one request)."""
        return EmbedResult(self.vectors[start:end], self.token_counts[start:end], self.queue_seconds,
                           self.compute_seconds)  # fmt: skip

    @staticmethod
    def joined(parts: list[EmbedResult]) -> EmbedResult:
        """The parts of one call computed one after another, in order: their rows and their times."""
        return EmbedResult(
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.token_counts for p in parts]),
            sum(p.queue_seconds for p in parts),
            sum(p.compute_seconds for p in parts),
        )


def resolve_options(
    entry: ModelEntry, prompt_name: str | None = None, normalize: bool | None = None, truncate: bool = True
) -> EmbedOptions:
    """A request's options: its own values, else the model's defaults (``default_prompt``, ``normalize``).
    An unknown ``prompt_name`` is a 400 listing the model's prompts."""
    if prompt_name is not None and prompt_name not in entry.prompts:
        raise ClientError(
            f"prompt_name {prompt_name!r} is not defined for model {entry.name!r}; "
            f"defined: {', '.join(sorted(entry.prompts)) or 'none'}",
            "prompt_not_found",
            "prompt_name",
        )
    return EmbedOptions(
        prompt=entry.prompt_text(prompt_name),
        normalize=entry.normalize if normalize is None else normalize,
        truncate=truncate,
    )
