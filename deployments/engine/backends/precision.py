"""What precision a forward pass really runs at, decided once per replica from the config and the hardware.

On a GPU the configured ``dtype`` is the weights' dtype. On a CPU the weights stay float32 and
``dtype: bfloat16`` means the matmuls run in bf16 (torch autocast, or OpenVINO's bf16 inference hint)
when the CPU has bf16 instructions (AMX or AVX-512 BF16); without them bf16 is emulated and slower than
float32, so the pass runs float32 and the replica says why. float16 is never fast on a CPU: float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The CPU flags (as /proc/cpuinfo names them) under which bf16 matmuls run in hardware.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Set to 0 to treat this CPU as having no bf16 (tests of the fallback; a CPU whose bf16 misbehaves).
CPU_BF16_ENV = "EMBEDDINGS_CPU_BF16"


@dataclass(frozen=True)
class Precision:
    """The dtype a pass computes in; ``note`` says why it differs from the configured one (else '')."""

    compute: str  # "float32" | "bfloat16" | "float16"
    note: str = ""


def bf16_flags(cpuinfo: str) -> list[str]:
    """The bf16 flags a /proc/cpuinfo text reports, in ``BF16_CPU_FLAGS`` order."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matmuls in hardware, and the evidence (flags, or why not)."""
    if os.environ.get(CPU_BF16_ENV) == "0":
        return False, f"{CPU_BF16_ENV}=0"
    try:
        found = bf16_flags(Path("/proc/cpuinfo").read_text())
    except OSError as exc:
        return False, f"cannot read /proc/cpuinfo ({exc})"
    if not found:
        return False, f"the CPU reports none of {', '.join(BF16_CPU_FLAGS)}"
    return True, ", ".join(found)


def resolve_precision(dtype: str, on_gpu: bool, bf16: tuple[bool, str] | None = None) -> Precision:
    """The precision a pass runs at for a configured ``dtype``; ``bf16`` is ``cpu_bf16()`` (computed when
    not given, and only on CPU)."""
    if on_gpu or dtype == "float32":
        return Precision(dtype)
    if dtype == "float16":
        return Precision("float32", "float16 has no fast path on CPU: running float32")
    has_bf16, evidence = bf16 if bf16 is not None else cpu_bf16()
    if has_bf16:
        return Precision("bfloat16")
    return Precision("float32", f"bfloat16 needs bf16 CPU instructions ({evidence}): running float32")
