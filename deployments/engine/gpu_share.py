"""A replica on a GPU, or a fraction of one, that holds: checked before it loads, capped, and warmed up.

Ray's GPU fractions are bookkeeping only (no memory isolation, ray#41432), so a replica placed on
``num_gpus: 0.25`` could take the whole card, and one that does not fit would fail under traffic, not at
start. A replica on a GPU therefore, before loading its weights, compares what its model needs
(``sizing.replica_gpu_memory_gb``: weights, CUDA context, activations at ``max_batch_tokens``) with its
share of the card and with the memory free on it now, and refuses to start with the numbers when either
is short; caps its own allocator at its share (``torch.cuda.set_per_process_memory_fraction``); and after
loading runs one pass at its full token budget, so an out-of-memory shows at start, not under traffic
(TEI does the same with ``--max-batch-tokens``).

The decisions are plain functions (``gpu_share_problem``, ``warmup_shape``), tested on CPU; the CUDA calls
are the thin ``prepare_gpu``. Not yet run on a GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.engine.device_faults import is_out_of_memory

if TYPE_CHECKING:
    from deployments.config import Batching, ModelEntry
    from deployments.engine.backends.base import EmbeddingBackend

log = logging.getLogger("ray.serve")
GB = 1e9


def gpu_share_problem(
    name: str, need_gb: float, fraction: float, total_gb: float, free_gb: float
) -> str | None:
    """Why a replica needing ``need_gb`` cannot start on ``fraction`` of a GPU of ``total_gb`` with
    ``free_gb`` free now, or None when it fits."""
    share = fraction * total_gb
    if need_gb > share:
        return (
            f"{name}: needs about {need_gb:.1f} GB of GPU memory (weights, CUDA context, activations at "
            f"max_batch_tokens) but its placement gives it {fraction:g} of a {total_gb:.1f} GB GPU "
            f"({share:.1f} GB): give it a larger GPU fraction, or lower batching.max_batch_tokens"
        )
    if need_gb > free_gb:
        return (
            f"{name}: needs about {need_gb:.1f} GB of GPU memory but only {free_gb:.1f} GB of the GPU's "
            f"{total_gb:.1f} GB are free now (other processes hold the rest)"
        )
    return None


def warmup_shape(batching: Batching, max_seq_length: int) -> tuple[int, int]:
    """(rows, tokens each) of the largest pass the planner may form: inputs of ``max_seq_length`` (or the
    whole budget if smaller), as many as the token budget and the row cap allow."""
    length = min(max_seq_length, batching.max_batch_tokens)
    rows = max(1, min(batching.max_batch_size, batching.max_batch_tokens // length))
    return rows, length


def warm_up(backend: EmbeddingBackend, batching: Batching, name: str) -> tuple[int, int]:
    """One pass at the full token budget; an out-of-memory here stops the replica's start with a message
    that says what to change. Returns the (rows, tokens each) it ran."""
    rows, length = warmup_shape(batching, backend.max_seq_length)
    item = backend.tokenize(["warm " * (2 * length)], "", max_length=length)[0]
    try:
        backend.forward([item] * rows)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise RuntimeError(
                f"{name}: a pass at its full token budget ({rows} inputs of {item.length} tokens, "
                f"max_batch_tokens {batching.max_batch_tokens}) does not fit in this replica's GPU memory; "
                f"lower batching.max_batch_tokens or give it a larger GPU share: {exc}"
            ) from exc
        raise
    log.info("%s: warmed up at its full token budget (%d inputs of %d tokens)", name, rows, item.length)
    return rows, item.length


def gpu_memory_gb(device: object) -> dict[str, float]:
    """What this process holds on its CUDA device (GB): reserved by torch's allocator now and at its peak,
    and allocated to tensors at the peak; empty off CUDA. Reported in the replica's stats, beside
    ``sizing.replica_gpu_memory_gb``'s prediction."""
    if getattr(device, "type", None) != "cuda":
        return {}
    import torch

    return {
        "gpu_reserved_gb": round(torch.cuda.memory_reserved(device) / GB, 3),
        "gpu_max_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 3),
        "gpu_max_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
    }


def prepare_gpu(entry: ModelEntry, fraction: float, base_dir: Path | None) -> None:
    """Before the weights load on a GPU: refuse a share that cannot hold the model, then cap this
    process's allocator at its share. Nothing to do without CUDA (the loader reports that)."""
    import torch

    from deployments.engine.sizing import replica_gpu_memory_gb

    if not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info()
    share = fraction if 0 < fraction < 1 else 1.0
    need = replica_gpu_memory_gb(entry, base_dir)
    if need is not None:
        problem = gpu_share_problem(entry.name, need, share, total / GB, free / GB)
        if problem:
            raise RuntimeError(problem)
    if share < 1.0:
        torch.cuda.set_per_process_memory_fraction(share)
        log.info("%s: allocator capped at %.2f of the GPU (%.1f GB)", entry.name, share, share * total / GB)
