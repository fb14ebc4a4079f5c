"""What a model call takes and gives, the same types in every layer.

``EmbedOptions``: how a request's texts are embedded, resolved once per request from what it asks and its
model's config. The same frozen object is the coalescer's key, part of the cache key and the model call's
argument, so an option added here reaches every layer without being renamed on the way.

``EmbedRequest``: one request's texts and options. A model deployment takes a list of them and answers
each on its own (its ``EmbedResult`` or the error about its own input), so no layer splits a request.

``EmbedResult``: what comes back, from the engine through the model deployment, the coalescer, the cache
(which fills in what it held) and the router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EmbedOptions:
    prompt: str = ""  # the instruction's text, prepended to every input
    normalize: bool = True  # L2-normalise the vectors
    truncate: bool = True  # cut inputs past max_seq_length (False: refuse them with a 400)


@dataclass(frozen=True)
class EmbedRequest:
    """One request's texts and options: the unit every layer keeps whole, down to the scheduler's call."""

    texts: list[str]
    options: EmbedOptions = EmbedOptions()


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dimension]
    token_counts: np.ndarray  # int32 [n]: tokens each input took, special tokens included
    queue_seconds: float = 0.0  # admission to the call's first forward pass
    compute_seconds: float = 0.0  # its first forward pass to its last

    @staticmethod
    def joined(parts: list[EmbedResult]) -> EmbedResult:
        """The parts of one call computed one after another, in order: their rows and their times."""
        return EmbedResult(
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.token_counts for p in parts]),
            sum(p.queue_seconds for p in parts),
            sum(p.compute_seconds for p in parts),
        )
