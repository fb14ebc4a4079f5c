"""Memory per replica, on a GPU and on a CPU, checked against what the placement gives before deploying.

Ray's fractional GPUs are bookkeeping only (no memory isolation), so four ``num_gpus: 0.25`` replicas of
a model that needs 30 GB would all land on one 24 GB GPU and fail at load or at the first large batch;
a CPU replica whose model outgrows the memory Ray reserved for it is killed by Ray's memory monitor (and
the Serve controller with it); and on one machine a replica asking for more than the machine has waits
forever while the router already answers. These checks run before deployment and name the numbers that
clash.

A model's size comes from its checkpoint's safetensors headers where the files are local (no weight is
read), else from the architecture of a known hub id (``KNOWN_SIZES``). A replica's need:

- GPU: weights (parameters x bytes of the dtype, +10% allocator slack) + 0.5 GB of CUDA context +
  activations bounded by the batch token budget (about 24 hidden-size-wide tensors per token in flight:
  attention projections, the MLP's wide intermediate, the output); for a sentence-transformers model in
  half precision, at least its float32 weights and activations, which the fidelity gate runs at load.
- CPU: weights in the dtype the CPU holds them in (``weight_dtype``) + for ``runtime: openvino`` the
  compiled graph's own copy of them in the configured dtype (OpenVINO keeps the float32 weights it read,
  mapped from its cache entry, and repacks them for its kernels: a bge-large shape in bf16 held 1.37 GB
  of the file and 0.67 GB of its own, docs/operations.md) + the same activations + 1 GB for the
  interpreter, torch, the tokenizer and Ray's worker.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from deployments.config import ModelEntry, ModelsConfig, Placement, resolve_model_source

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_CONTEXT_GB = 0.5
ACTIVATION_WIDTHS = 24
# A CPU replica beside its weights and activations: interpreter, torch, tokenizer, Ray's worker.
CPU_RUNTIME_GB = 1.0
# Serve's replica default when a placement does not say (ray/serve/_private/config.py).
SERVE_DEFAULT_NUM_CPUS = 1.0


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
    """From a local checkpoint: parameters counted from its safetensors headers, hidden size from
    config.json (top level or a sentence-transformers module folder). The weights at the top level when
    there are any (a subfolder may hold another copy, e.g. the Hugging Face model a sentence-transformers
    folder was built from), else those one folder down (``0_Transformer/``)."""
    from deployments.engine.backends.safetensors_files import parameter_count

    configs = list(path.glob("config.json")) + list(path.glob("*/config.json"))
    files = list(path.glob("*.safetensors")) or list(path.glob("*/*.safetensors"))
    if not configs or not files:
        return None
    raw = json.loads(configs[0].read_text())
    hidden = raw.get("hidden_size") or raw.get("text_config", {}).get("hidden_size")
    return ModelSize(parameter_count(files) / 1e9, int(hidden)) if hidden else None


def model_size(entry: ModelEntry, base_dir: Path | None = None) -> ModelSize | None:
    if entry.source in KNOWN_SIZES:
        return KNOWN_SIZES[entry.source]
    try:
        path = Path(resolve_model_source(entry.source, base_dir))
    except FileNotFoundError:
        return None
    return _local_size(path) if path.is_dir() else None


def weight_dtype(entry: ModelEntry, on_gpu: bool) -> str:
    """The dtype a replica holds its weights in: the configured one on a GPU, and for NV-Embed everywhere
    (``nvembed.nvembed_dtype``); float32 for the other models on a CPU, whose bf16 runs by autocast or
    OpenVINO (``backends/precision.py``)."""
    return entry.dtype if on_gpu or entry.backend == "nvembed" else "float32"


def _activations_gb(entry: ModelEntry, size: ModelSize, dtype: str) -> float:
    return entry.batching.max_batch_tokens * size.hidden_size * BYTES[dtype] * ACTIVATION_WIDTHS / 1e9


def replica_gpu_memory_gb(entry: ModelEntry, base_dir: Path | None = None) -> float | None:
    """The entry's ``gpu_memory_gb`` if set, else the estimate; None when the size is unknown."""
    if entry.gpu_memory_gb is not None:
        return entry.gpu_memory_gb
    size = model_size(entry, base_dir)
    if size is None:
        return None
    weights = size.params_billion * BYTES[entry.dtype] * 1.1
    need = weights + CUDA_CONTEXT_GB + _activations_gb(entry, size, "float16")
    if entry.backend != "nvembed" and entry.dtype != "float32":
        # The fidelity gate embeds its probes with the float32 weights before converting them
        # (``SentenceTransformersBackend._gate_half_weights``): the load's peak.
        gate = size.params_billion * BYTES["float32"] * 1.1 + _activations_gb(entry, size, "float32")
        need = max(need, gate + CUDA_CONTEXT_GB)
    return round(need, 1)


@dataclass(frozen=True)
class CpuNeed:
    """What one CPU replica of a model holds, in GB."""

    weights: float
    dtype: str
    activations: float
    compiled: float = 0.0  # OpenVINO's repacked copy of the weights, in ``compiled_dtype``
    compiled_dtype: str = ""

    @property
    def total(self) -> float:
        return round(self.weights + self.compiled + self.activations + CPU_RUNTIME_GB, 1)

    def describe(self) -> str:
        copy = f" + OpenVINO's copy {self.compiled:.1f} GB in {self.compiled_dtype}" if self.compiled else ""
        return (
            f"weights {self.weights:.1f} GB in {self.dtype}{copy} + activations {self.activations:.1f} GB at "
            f"max_batch_tokens + {CPU_RUNTIME_GB:g} GB runtime"
        )


def replica_cpu_memory(entry: ModelEntry, base_dir: Path | None = None) -> CpuNeed | None:
    """The memory a CPU replica of the entry needs; None when the model's size is unknown."""
    size = model_size(entry, base_dir)
    if size is None:
        return None
    dtype = weight_dtype(entry, on_gpu=False)
    need = CpuNeed(size.params_billion * BYTES[dtype], dtype, _activations_gb(entry, size, dtype))
    if entry.runtime == "openvino":
        need = replace(need, compiled=size.params_billion * BYTES[entry.dtype], compiled_dtype=entry.dtype)
    return need


def check_cpu_memory(config: ModelsConfig, base_dir: Path | None = None) -> list[str]:
    """Problems with CPU placements whose ``memory_gb`` (Ray's ``memory`` resource per replica) cannot hold
    a model placed on them: Ray would place the replica, and its memory monitor would kill it."""
    problems = []
    for i, entry in enumerate(config.models):
        placement = config.placements.get(entry.placement)
        if placement is None or placement.num_gpus > 0 or placement.memory_gb is None:
            continue
        need = replica_cpu_memory(entry, base_dir)
        if need is None:
            problems.append(
                f"models[{i}] ({entry.name}).source: cannot size {entry.source!r} to check "
                f"placements.{entry.placement}.memory_gb; give a local checkpoint with safetensors files"
            )
        elif need.total > placement.memory_gb:
            problems.append(
                f"placements.{entry.placement}.memory_gb: {placement.memory_gb:g} GB per replica, but "
                f"models[{i}] ({entry.name}) needs about {need.total:.1f} GB ({need.describe()}); raise "
                "memory_gb or lower the model's batching.max_batch_tokens"
            )
    return problems


@dataclass(frozen=True)
class Machine:
    """What one machine offers Ray: CPUs, GPUs, the ``memory`` resource (GB) and custom resources."""

    cpus: float
    gpus: float
    memory_gb: float
    resources: dict[str, float] = field(default_factory=dict)


# Ray's object store takes this share of a node's memory unless told otherwise; the rest is its `memory`
# resource (ray/_private/resource_and_label_spec.py). The service moves only vectors through it.
OBJECT_STORE_PROPORTION_ENV = "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"


def this_machine(object_store_share: float | None = None) -> Machine:
    """What ``serve run`` will find here when it starts Ray: every CPU, the NVIDIA GPUs the driver lists
    (narrowed by CUDA_VISIBLE_DEVICES), and available memory less the object store's share (None: this
    process's ``OBJECT_STORE_PROPORTION_ENV``, else Ray's default 0.3)."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    gpus_dir = Path("/proc/driver/nvidia/gpus")
    gpus = float(len(list(gpus_dir.iterdir()))) if gpus_dir.is_dir() else 0.0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, float(len([d for d in visible.split(",") if d.strip()])))
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    available_gb = int(info["MemAvailable"].split()[0]) * 1024 / 1e9
    share = object_store_share
    if share is None:
        share = float(os.environ.get(OBJECT_STORE_PROPORTION_ENV, "0.3"))
    return Machine(cpus, gpus, round(available_gb * (1 - share), 1))


@dataclass(frozen=True)
class ReplicaDemand:
    """What one deployment asks Ray for, per replica, and how many replicas must start."""

    label: str
    placement_key: str
    replicas: int
    cpus: float
    gpus: float
    memory_gb: float
    resources: dict[str, float]


def _demand(label: str, key: str, placement: Placement, replicas: int) -> ReplicaDemand:
    cpus = placement.num_cpus if placement.num_cpus is not None else SERVE_DEFAULT_NUM_CPUS
    return ReplicaDemand(
        label, key, replicas, cpus, placement.num_gpus, placement.memory_gb or 0.0, dict(placement.resources)
    )


def replica_demands(config: ModelsConfig) -> list[ReplicaDemand]:
    """Every deployment's per-replica request and the replicas it starts with (autoscaling: its initial or
    minimum count, at least one)."""
    local = config.in_process_entry
    demands = []
    for i, entry in enumerate(config.models):
        if entry is local or entry.placement not in config.placements:
            continue
        scaling = entry.autoscaling
        count = entry.num_replicas or 1
        if scaling is not None:
            count = max(
                1, scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas
            )
        placement = config.placements[entry.placement]
        demands.append(
            _demand(f"models[{i}] ({entry.name})", f"placements.{entry.placement}", placement, count)
        )
    if local is not None:
        placement = config.placements[local.placement]
        count = local.num_replicas or 1
        if local.autoscaling is not None:
            scaling = local.autoscaling
            count = max(
                1, scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas
            )
        demands.append(
            _demand(f"router (runs {local.name})", f"placements.{local.placement}", placement, count)
        )
    else:
        router = Placement(num_cpus=config.router.num_cpus)
        demands.append(_demand("router", "router.num_cpus", router, config.router.num_replicas))
    return demands


def check_one_machine(config: ModelsConfig, machine: Machine) -> list[str]:
    """Problems with a config served on one machine (``make serve``): a replica asking for more CPUs, GPUs,
    memory or a resource than the machine has can never be placed, and replicas that together ask for more
    than it has leave some waiting forever (Serve starts the app and the router answers meanwhile)."""
    problems = []
    for d in replica_demands(config):
        for what, want, have in (("num_cpus", d.cpus, machine.cpus), ("num_gpus", d.gpus, machine.gpus)):
            if want > have:
                problems.append(
                    f"{d.placement_key}.{what}: {d.label} asks for {want:g} per replica, this machine has "
                    f"{have:g}"
                )
        if d.memory_gb > machine.memory_gb:
            problems.append(
                f"{d.placement_key}.memory_gb: {d.label} asks for {d.memory_gb:g} GB per replica, Ray offers "
                f"{machine.memory_gb:g} GB for replicas on this machine (available memory less the object "
                f"store's share, {OBJECT_STORE_PROPORTION_ENV})"
            )
        for name, amount in d.resources.items():
            if amount > machine.resources.get(name, 0.0):
                problems.append(
                    f"{d.placement_key}.resources.{name}: {d.label} asks for {amount:g}, this machine offers "
                    f"{machine.resources.get(name, 0.0):g} (a cluster node's resource: see docs/cluster.md)"
                )
    if problems:
        return problems
    demands = replica_demands(config)
    for what, attr, have, unit in (
        ("CPUs", "cpus", machine.cpus, ""),
        ("GPUs", "gpus", machine.gpus, ""),
        ("memory", "memory_gb", machine.memory_gb, " GB"),
    ):
        parts = [(d, d.replicas * getattr(d, attr)) for d in demands if getattr(d, attr) > 0]
        total = sum(amount for _, amount in parts)
        if total > have + 1e-9:
            listed = " + ".join(f"{d.label} {d.replicas} x {getattr(d, attr):g}{unit}" for d, _ in parts)
            problems.append(
                f"placements: the replicas ask for {total:g}{unit} of {what} in all ({listed}), this machine "
                f"has {have:g}{unit}: some would wait forever; lower num_cpus / num_replicas or serve on a "
                "cluster"
            )
    return problems


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
