"""Safetensors checkpoints read by their headers and loaded one tensor at a time, leaving nothing behind.

Why not ``safe_open``: its tensors are views of a memory map, so every page of the file a pass touches
stays resident as page cache that the process maps. For a 15.7 GB checkpoint converted to another dtype
at load, the process then holds the converted weights *and* the mapped file: 1.5x the checkpoint, which
Ray's memory monitor counts (it counts active page cache as used) and answers by killing the replica and
the Serve controller, in a loop, on a 24 GB machine. Here each tensor is read with plain ``read`` calls
into memory the process owns, converted, and its file range dropped from the page cache, so a model's
weights are held exactly once, in its serving dtype.

The headers alone also give a checkpoint's parameter count and bytes without reading any weight
(``deployments/engine/sizing.py``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's bytes lie in its file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | Path) -> list[TensorRecord]:
    """The tensors of one ``.safetensors`` file, in file order; reads only the header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    records = [
        TensorRecord(
            name,
            meta["dtype"],
            tuple(meta["shape"]),
            base + meta["data_offsets"][0],
            base + meta["data_offsets"][1],
        )
        for name, meta in header.items()
        if name != "__metadata__"
    ]
    return sorted(records, key=lambda r: r.start)


def checkpoint_shards(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder: the index's shards, else ``model.safetensors``."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def parameter_count(files: list[Path]) -> int:
    """Elements of every floating-point tensor in ``files`` (the weights), from their headers."""
    return sum(r.numel for f in files for r in read_header(f) if DTYPES[r.dtype][0].is_floating_point)


def _drop_cache(fd: int, start: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


def iter_tensors(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a ``.safetensors`` file on ``device`` in ``dtype`` (floating-point tensors only;
    None: as stored), its file range then dropped from the page cache. A tensor kept as stored on the CPU
    is read straight into its own memory; any other goes through one staging buffer, reused for the whole
    file, so converting allocates nothing but the results (freed buffers of a 15.7 GB load would otherwise
    linger in the allocator while the next ones are read)."""
    device = torch.device(device)
    records = read_header(path)
    staging = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        for record in records:
            stored, _ = DTYPES[record.dtype]
            target = dtype if dtype is not None and stored.is_floating_point else stored
            nbytes = record.end - record.start
            if target == stored and device.type == "cpu":
                tensor = torch.empty(record.shape, dtype=stored)
                _read_into(f, record, tensor.view(-1).view(torch.uint8) if nbytes else staging[:0])
                yield record.name, tensor
                continue
            if staging.numel() < nbytes:
                staging = torch.empty(nbytes, dtype=torch.uint8)
            raw = staging[:nbytes]
            _read_into(f, record, raw)
            yield (
                record.name,
                raw.view(stored).reshape(record.shape).to(device=device, dtype=target, copy=True),
            )


def _read_into(f, record: TensorRecord, buffer: torch.Tensor) -> None:
    """The record's bytes into ``buffer`` (uint8, exactly their size); then out of the page cache."""
    view = memoryview(buffer.numpy())
    f.seek(record.start)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"{f.name}: {record.name} is cut short ({done} of {len(view)} bytes)")
        done += n
    _drop_cache(f.fileno(), record.start, record.end - record.start)
