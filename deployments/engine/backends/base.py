"""What every model family implements so the batcher can drive it.

A backend tokenises once per request (``tokenize``), and runs forward passes over any grouping of
already-tokenised inputs (``forward``); the batcher decides the grouping. Results must not depend on
the grouping beyond floating-point noise.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # torch is imported where a model loads, not by the modules that wire the app to Serve
    import torch


@dataclass(frozen=True)
class ServingPath:
    """What actually computes a model's passes, as ``info()`` and ``/v1/models`` report it."""

    runtime: str  # "torch" | "openvino"
    precision: str  # what the matmuls run in: "float32" | "bfloat16" | "float16"
    # Worst cosine to torch float32 over the fidelity probes; None where no fast path was checked.
    worst_cosine: float | None = None
    note: str = ""  # why this differs from the configured runtime or dtype, else ''


@dataclass
class EncodedText:
    """One tokenised input: 1-D int64 arrays (numpy, or torch where the backend tokenises with torch) of
    its real length, no padding."""

    features: dict[str, np.ndarray] | dict[str, torch.Tensor]
    length: int


class PendingPass(Protocol):
    """A launched forward pass (``EmbeddingBackend.launch``; CUDA's is ``device_pass.CudaPass``)."""

    def result(self) -> np.ndarray:
        """float32 [rows, dimension]; waits for the pass and raises what it raised."""

    def done(self) -> bool:
        """True once the pass has ended on the device (never waits)."""

    def device_seconds(self) -> float | None:
        """The device's own time for the pass (after ``result``), where the device times it; else None."""


class DonePass:
    """A pass that already ran (a CPU computes where it launches), or that failed to launch: ``result``
    raises its error, where the scheduler's failure handling expects a pass's error."""

    def __init__(self, vectors: np.ndarray | None = None, error: Exception | None = None):
        self._vectors, self._error = vectors, error

    def result(self) -> np.ndarray:
        if self._error is not None:
            raise self._error
        assert self._vectors is not None
        return self._vectors

    def done(self) -> bool:
        return True

    def device_seconds(self) -> float | None:
        return None


class EmbeddingBackend(ABC):
    """A loaded model that turns tokenised texts into float32 vectors."""

    dimension: int
    max_seq_length: int
    device: torch.device | str
    # True when ``forward`` concatenates its inputs instead of padding them: a micro-batch then costs its
    # real tokens, and the planner groups by token sum rather than rows x longest.
    packed: bool = False
    # True where ``launch`` returns before the pass is done (CUDA, ``device_pass.launch_on_device``): the
    # scheduler then launches the next pass before reading this one back.
    asynchronous: bool = False
    serving: ServingPath = ServingPath("torch", "float32")
    load_seconds: dict[str, float] = {}  # seconds per load step, where the backend measures them

    @abstractmethod
    def tokenize(self, texts: list[str], prompt: str, max_length: int | None = None) -> list[EncodedText]:
        """Tokenise ``prompt + text`` for each text, truncated at ``max_length`` tokens (None:
        ``max_seq_length``). Whether an input may be truncated is the engine's decision
        (``engine.tokenize_capped``), not the backend's. A family's own refusal of an input is a
        ``ClientError`` whose ``index`` is the input's place in ``texts``."""

    @abstractmethod
    def forward(self, items: list[EncodedText]) -> np.ndarray:
        """Embed one micro-batch: float32 [len(items), dimension], in the order given."""

    def launch(self, items: list[EncodedText]) -> PendingPass:
        """Start a pass; where the device queues work (CUDA) it returns at once. Here: runs it to the end."""
        return DonePass(self.forward(items))

    def init_thread(self) -> None:  # noqa: B027 - a hook: most runtimes need nothing per thread
        """Called on each thread the engine tokenises or runs passes on (torch counts threads per thread)."""

    def release_memory(self) -> None:
        """After a pass ran out of device memory: hand the allocator's cached blocks back, so the smaller
        passes that follow find room. On CUDA that is torch's cache; elsewhere there is nothing to free."""
        if getattr(self.device, "type", self.device) != "cuda":
            return
        import torch

        torch.cuda.empty_cache()


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: the configured one on GPU; float32 on CPU, where a bf16 pass is run by autocast
    or the runtime instead (``deployments/engine/backends/precision.py``)."""
    import torch

    if device.type == "cpu":
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# Set to 1 only where Ray's GPUs are fake (tests on ray.cluster_utils.Cluster): replicas then run on CPU.
FAKE_GPUS_ENV = "EMBEDDINGS_FAKE_GPUS"


def pick_device(want_gpu: bool) -> torch.device:
    """CUDA for a replica Ray gave GPUs, CPU otherwise. A replica placed on GPUs whose CUDA is unusable fails
    at start: silently loading on CPU would put NV-Embed-v2 (31 GB in float32) in host memory and crawl."""
    import torch

    if not want_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(FAKE_GPUS_ENV) == "1":
        return torch.device("cpu")
    raise RuntimeError(
        f"this replica's placement gives it GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but CUDA is unusable here (torch {torch.__version__}, "
        f"built for CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s) visible); refusing to "
        "load the model on CPU. Fix the node's driver or torch build, or place the model on a CPU class."
    )


def pad_arrays(items: list[EncodedText], pad_values: dict[str, int]) -> dict[str, np.ndarray]:
    """Stack each numpy feature of a micro-batch into int64 [rows, longest], padding on the right."""
    longest = max(it.length for it in items)
    out = {}
    for key in items[0].features:
        batch = np.full((len(items), longest), pad_values.get(key, 0), dtype=np.int64)
        for row, it in enumerate(items):
            batch[row, : it.length] = it.features[key]
        out[key] = batch
    return out


def pad_right(items: list[EncodedText], pad_values: dict[str, int]) -> dict[str, torch.Tensor]:
    """Stack each torch feature of a micro-batch into [rows, longest], padding on the right."""
    import torch

    out = {}
    for key in items[0].features:
        out[key] = torch.nn.utils.rnn.pad_sequence(
            [it.features[key] for it in items], batch_first=True, padding_value=pad_values.get(key, 0)
        )
    return out
