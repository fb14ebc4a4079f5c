"""Vector math shared by the engine (a call's answer) and the wire format (``dimensions``)."""

from __future__ import annotations

import numpy as np


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length, as sentence-transformers' Normalize does (a zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
