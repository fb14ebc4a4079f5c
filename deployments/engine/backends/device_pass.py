"""A forward pass started on a device and read back later, so the host never holds the device idle.

On CUDA, torch queues kernels and returns: a pass is *launched* (inputs copied from pinned host memory
with ``non_blocking``, kernels queued, the output queued for a copy into pinned host memory) and its
result read later (``PendingPass.result`` waits for the pass's own event, not for the whole device). The
scheduler launches the next pass before reading the current one back, so planning, padding and launching
pass N+1 happen while the device runs pass N, and reading N's vectors back does not stall N+1.

On a CPU a pass computes where it is launched: ``launch_on_device`` runs it and returns it done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from deployments.engine.backends.base import DonePass, PendingPass


class CudaPass:
    """A launched CUDA pass: its output on its way to pinned host memory, and events around its work."""

    def __init__(self, host: torch.Tensor, started: torch.cuda.Event, done: torch.cuda.Event):
        self._host, self._started, self._done = host, started, done

    def result(self) -> np.ndarray:
        self._done.synchronize()  # this pass's copy back, not the passes launched after it
        return self._host.numpy()

    def done(self) -> bool:
        return self._done.query()

    def device_seconds(self) -> float | None:
        return self._started.elapsed_time(self._done) / 1000.0


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors onto ``device``; on CUDA through pinned memory with ``non_blocking``, so the copy is
    queued behind the pass running now instead of waiting for it."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}


def launch_on_device(device: torch.device, compute: Callable[[], torch.Tensor]) -> PendingPass:
    """Run ``compute`` (a pass returning its [rows, dimension] output on ``device``): on CUDA queued, with
    the float32 output copied to pinned host memory behind it; elsewhere to the end, here."""
    if device.type != "cuda":
        return DonePass(compute().float().numpy())
    started = torch.cuda.Event(enable_timing=True)
    started.record()
    out = compute().float()
    host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(out, non_blocking=True)
    done = torch.cuda.Event(enable_timing=True)
    done.record()
    return CudaPass(host, started, done)
