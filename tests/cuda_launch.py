"""A launch on CUDA that must not wait for the device, shared by the GPU-only tests of each backend."""

from __future__ import annotations

import numpy as np
import torch

from deployments.engine.backends.base import EmbeddingBackend, EncodedText


def launch_without_sync(backend: EmbeddingBackend, items: list[EncodedText]) -> np.ndarray:
    """``items``' vectors from a launch made under ``torch.cuda.set_sync_debug_mode('error')``, which raises
    on any call that waits for the device (after one warm pass: the first loads kernels). A launch that
    waits would hold the scheduler's next launch until the pass running ends, leaving the GPU idle."""
    backend.launch(items).result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = backend.launch(items)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return pending.result()
