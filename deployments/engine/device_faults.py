"""What a forward pass's exception says about the device, and the token budget that follows from it.

Two kinds of device failure need more than failing the callers of one pass:

- **Out of memory** (``torch.OutOfMemoryError``; on CUDA "CUDA out of memory"): recoverable. The pass is
  run again split in two after the allocator's cached blocks are freed, and the passes that follow get a
  smaller token budget (``TokenBudget``), earned back step by step while passes succeed. An input that
  does not fit even alone fails only its own caller.
- **A poisoned context** (a device-side assert, an illegal memory access, a launch failure): CUDA cannot
  recover in this process, and every later call would fail too. The replica reports itself unhealthy so
  Serve replaces it (``DeviceFault``), and its callers are told to retry elsewhere.

Recognised by the exception's class name and message, so this module needs no torch (OpenVINO replicas
never import it). Pure: unit-tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

# torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class); older builds raise a RuntimeError.
OOM_CLASS_NAMES = frozenset({"OutOfMemoryError"})
OOM_MARKERS = ("out of memory", "cuda_error_out_of_memory", "cublas_status_alloc_failed")
# CUDA errors after which the context is unusable ("sticky" errors), as torch and CUDA word them.
POISON_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "cudaerrorlaunchfailure",
    "cublas_status_execution_failed",
    "an illegal",
    "uncorrectable ecc error",
)


def is_out_of_memory(error: BaseException) -> bool:
    """The device ran out of memory for this pass (and nothing worse)."""
    if type(error).__name__ in OOM_CLASS_NAMES:
        return True
    text = str(error).lower()
    return any(marker in text for marker in OOM_MARKERS) and not is_poisoned_context(error)


def is_poisoned_context(error: BaseException) -> bool:
    """A CUDA error that leaves the process's context unusable: every later call would fail too."""
    text = str(error).lower()
    return any(marker in text for marker in POISON_MARKERS)


class DeviceFault(RuntimeError):
    """The replica's device failed in a way this process cannot recover from (a poisoned CUDA context):
    a server fault (503, code ``device_fault``) that another replica can serve, so callers may retry."""


class DeviceAlreadyFailed(DeviceFault):
    """A call refused by a replica whose device failed before the call came (it computed nothing): the
    replica is being replaced, so the call goes elsewhere without counting against its inputs."""


class DeviceMemoryError(RuntimeError):
    """One input needs more device memory than this replica has, even in a pass of its own."""


@dataclass
class TokenBudget:
    """Tokens a pass may hold: the configured ``ceiling`` until a pass runs out of memory, then half of
    what that pass held (never below ``floor``); each ``recover_after`` passes in a row that succeed raise
    it by ``growth`` back towards the ceiling, so a transient squeeze (another process on the GPU, a
    fragmented allocator) costs throughput only for a while."""

    ceiling: int
    floor: int = 1
    recover_after: int = 20
    growth: float = 1.25
    current: int = 0
    successes: int = 0
    shrinks: int = 0

    def __post_init__(self) -> None:
        self.floor = max(1, min(self.floor, self.ceiling))
        self.current = self.current or self.ceiling

    def out_of_memory(self, pass_tokens: int) -> None:
        """A pass of ``pass_tokens`` (padded) did not fit: the next passes hold at most half of it."""
        self.current = max(self.floor, min(self.current, pass_tokens) // 2)
        self.successes = 0
        self.shrinks += 1

    def succeeded(self) -> bool:
        """A pass fitted; True when that raised the budget."""
        if self.current >= self.ceiling:
            return False
        self.successes += 1
        if self.successes < self.recover_after:
            return False
        self.current = min(self.ceiling, max(self.current + 1, int(self.current * self.growth)))
        self.successes = 0
        return True
