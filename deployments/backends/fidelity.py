"""The fidelity gate: a fast path serves only if it gives the exact path's vectors.

At load, a replica embeds a fixed probe set with the configured fast path (bf16, OpenVINO) and with torch
float32, the reference that ``SentenceTransformer.encode`` computes. The probes cover what breaks a
compiled or low-precision pass: a one-word text, an empty one, unicode, a text past ``max_seq_length``
(truncation), each alone, and the short ones padded together in one pass (masking); the long one runs
alone only, so that the gate costs two passes of ``max_seq_length`` tokens, not a batch of them. If the
worst cosine between the two falls below the configured bound, the replica logs the figure and serves
torch float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# A long passage built from ordinary English words, repeated past any max_seq_length.
_LONG_WORDS = (
    "the knowledge tree links each entity to the communities it belongs to and the passages that "
    "describe it so that retrieval can follow relations as well as similarity"
).split()


def probe_texts(max_seq_length: int) -> list[str]:
    """Short, empty, unicode and medium texts, then (last) one longer than ``max_seq_length``."""
    long_text = " ".join(_LONG_WORDS[i % len(_LONG_WORDS)] for i in range(2 * max_seq_length))
    return [
        "Paris",
        "",
        "Marie Curie",
        "naïve café, Zürich – 東京タワー, Ελλάδα, Москва 🙂",
        "Alan Turing was a mathematician who formalised computation and broke ciphers during the war.",
        " ".join(_LONG_WORDS[:30]),
        long_text,
    ]


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine between two [n, d] arrays, or two vectors (computed in float64): the
    figure every fidelity check in the project (gate, tests, benchmarks) reports."""
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30)))


def probe_worst_cosine(
    candidate: Callable[[Sequence[int]], np.ndarray],
    reference: Callable[[Sequence[int]], np.ndarray],
    count: int,
) -> float:
    """Worst cosine over ``count`` probes, each embedded alone and all but the last (the long one) in one
    padded pass; ``candidate`` / ``reference`` embed the probes whose indices they are given. Non-finite
    output counts as -1."""
    groups: list[Sequence[int]] = [[i] for i in range(count)] + [list(range(count - 1))]
    worst = 1.0
    for group in groups:
        got, want = candidate(group), reference(group)
        if not np.isfinite(got).all():
            return -1.0
        worst = min(worst, worst_cosine(got, want))
    return worst
