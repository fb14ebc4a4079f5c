"""GPU memory per replica, and whether a placement class's packing can fit its GPUs.

Ray's fractional GPUs are bookkeeping only (no memory isolation), so four ``num_gpus: 0.25`` replicas of
a model that needs 30 GB would all land on one 24 GB GPU and fail at load or at the first large batch.
These checks run before deployment and name the numbers that clash.

A replica's need: weights (parameters x bytes of the dtype, +10% allocator slack) + 0.5 GB of CUDA context
+ activations bounded by the batch token budget (about 24 hidden-size-wide half-precision tensors per
token in flight: attention projections, the MLP's wide intermediate, the output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deployments.config import ModelEntry, ModelsConfig, resolve_model_source

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_CONTEXT_GB = 0.5
ACTIVATION_WIDTHS = 24


@dataclass(frozen=True)
class ModelSize:
    params_billion: float
    hidden_size: int


# Hub ids served in configs/models.yaml (parameter counts from their model cards / checkpoints).
KNOWN_SIZES = {
    "nvidia/NV-Embed-v2": ModelSize(7.85, 4096),
    "BAAI/bge-large-en-v1.5": ModelSize(0.335, 1024),
    "BAAI/bge-large-zh-v1.5": ModelSize(0.326, 1024),
    "intfloat/e5-large-v2": ModelSize(0.335, 1024),
    "sentence-transformers/all-mpnet-base-v2": ModelSize(0.109, 768),
    "moka-ai/m3e-large": ModelSize(0.326, 1024),
    "sentence-transformers/all-MiniLM-L6-v2": ModelSize(0.0227, 384),
}


def _local_size(path: Path) -> ModelSize | None:
    """From a local checkpoint: parameters from the safetensors' sizes, hidden size from config.json."""
    configs = list(path.glob("config.json")) + list(path.glob("*/config.json"))
    files = list(path.glob("*.safetensors")) + list(path.glob("*/*.safetensors"))
    if not configs or not files:
        return None
    raw = json.loads(configs[0].read_text())
    hidden = raw.get("hidden_size") or raw.get("text_config", {}).get("hidden_size")
    stored = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    params = sum(f.stat().st_size for f in files) / BYTES.get(stored, 4)
    return ModelSize(params / 1e9, int(hidden)) if hidden else None


def model_size(entry: ModelEntry, base_dir: Path | None = None) -> ModelSize | None:
    if entry.source in KNOWN_SIZES:
        return KNOWN_SIZES[entry.source]
    try:
        path = Path(resolve_model_source(entry.source, base_dir))
    except FileNotFoundError:
        return None
    return _local_size(path) if path.is_dir() else None


def replica_gpu_memory_gb(entry: ModelEntry, base_dir: Path | None = None) -> float | None:
    """The entry's ``gpu_memory_gb`` if set, else the estimate; None when the size is unknown."""
    if entry.gpu_memory_gb is not None:
        return entry.gpu_memory_gb
    size = model_size(entry, base_dir)
    if size is None:
        return None
    weights = size.params_billion * BYTES[entry.dtype] * 1.1
    activations = entry.batching.max_batch_tokens * size.hidden_size * 2 * ACTIVATION_WIDTHS / 1e9
    return round(weights + CUDA_CONTEXT_GB + activations, 1)


def check_gpu_packing(config: ModelsConfig, base_dir: Path | None = None) -> list[str]:
    """Problems with classes whose GPUs could be packed beyond their memory, worst case first.

    On a class with ``num_gpus: f``, Ray may put floor(1/f) replicas of that class's models on one GPU,
    in any mix; the worst mix takes the biggest replicas (each model at most its replica count).
    """
    problems = []
    for class_name, placement in config.placements.items():
        if placement.num_gpus <= 0 or placement.gpu_memory_gb is None:
            continue
        slots = max(1, int(1 / placement.num_gpus + 1e-9))
        needs: list[tuple[float, str]] = []
        for i, entry in enumerate(config.models):
            if entry.placement != class_name:
                continue
            need = replica_gpu_memory_gb(entry, base_dir)
            if need is None:
                problems.append(
                    f"models[{i}] ({entry.name}).gpu_memory_gb: cannot estimate the GPU memory of "
                    f"{entry.source!r}; set gpu_memory_gb (placement {class_name} is memory-checked)"
                )
                continue
            needs += [(need, entry.name)] * min(slots, entry.max_replicas)
        worst = sorted(needs, reverse=True)[:slots]
        total = sum(n for n, _ in worst)
        if worst and total > placement.gpu_memory_gb:
            parts = {}
            for need, name in worst:
                parts.setdefault((name, need), 0)
                parts[(name, need)] += 1
            mix = " + ".join(f"{name} x{count} ({need} GB each)" for (name, need), count in parts.items())
            gb = placement.gpu_memory_gb
            problems.append(
                f"placements.{class_name}: up to {slots} replica(s) share one {gb:g} GB GPU "
                f"(num_gpus {placement.num_gpus:g}): {mix} = {total:.1f} GB > {gb:g} GB"
            )
    return problems
