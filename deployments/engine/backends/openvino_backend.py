"""sentence-transformers models served by OpenVINO on CPU, with no torch in the replica once converted.

``load_openvino`` is the ``runtime: openvino`` loader. It looks for the model's entry in the compile cache
(``deployments/engine/backends/openvino_runtime.py``); without one it loads the model with
sentence-transformers (torch float32, the reference), converts it, computes the probes' reference vectors and
writes the entry. Either way the graph is compiled for this replica's CPU threads at the pass's precision
(bf16 where the CPU has it, else f32) and the fidelity gate compares it with the reference: at or above
``fidelity_min_cosine`` the ``OpenVINOBackend`` serves; below it the replica logs the figure and serves
sentence-transformers in torch float32.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deployments.engine.backends.base import EmbeddingBackend, EncodedText, ServingPath, pad_arrays
from deployments.engine.backends.fast_tokenizer import DirectTokenizer
from deployments.engine.backends.fidelity import probe_texts, probe_worst_cosine
from deployments.engine.backends.model_files import local_model_dir
from deployments.engine.backends.openvino_runtime import (
    OpenVINOPipeline,
    convert,
    entry_key,
    openvino_module,
    read_pipeline,
    save_pipeline,
)
from deployments.engine.backends.precision import Precision, resolve_precision

if TYPE_CHECKING:  # torch and sentence-transformers load only where a model is converted
    from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend

log = logging.getLogger(__name__)

OV_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
# Kernels OpenVINO's CPU plugin keeps per input shape (default 5000). Every (rows, length) of a pass is a
# new shape, so with the default a replica's memory grew ~0.3 MB a pass for hours (measured: 734 -> 1,576
# MB over 1,500 passes of random shapes; with 100: 1,018 -> 1,085 after the first 250).
RUNTIME_CACHE_CAPACITY = 100


class OpenVINOBackend(EmbeddingBackend):
    """Tokenises with the model's fast tokenizer and runs the compiled graph; the model thread is the only
    caller of ``forward``."""

    device = "cpu"

    def __init__(self, pipeline: OpenVINOPipeline, *, precision: Precision, threads: int, how: str):
        compiled = (
            openvino_module()
            .Core()
            .compile_model(
                pipeline.model,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": OV_PRECISION[precision.compute],
                    "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY",
                    "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY,
                },
            )
        )
        self.pipeline = pipeline
        self.precision = precision
        self.serving_how = f"OpenVINO model {how}"  # converted, or read from the cache
        self.dimension = pipeline.dimension
        self.max_seq_length = pipeline.max_seq_length
        self.tokenizer = DirectTokenizer(
            pipeline.tokenizer_json, pipeline.input_names, pipeline.max_seq_length
        )
        self._pad_values = {"input_ids": pipeline.pad_token_id}
        self._input_names = [inp.get_any_name() for inp in compiled.inputs]
        self._output = compiled.outputs[0]
        self._request = compiled.create_infer_request()
        self._compiled = compiled
        self.serving = ServingPath("openvino", precision.compute, None, precision.note)

    def tokenize(self, texts: list[str], prompt: str, max_length: int | None = None) -> list[EncodedText]:
        return self.tokenizer.encode(texts, prompt, max_length)

    def forward(self, items: list[EncodedText]) -> np.ndarray:
        batch = pad_arrays(items, self._pad_values)
        outputs = self._request.infer({name: batch[name] for name in self._input_names})
        return np.asarray(outputs[self._output], dtype=np.float32)

    def worst_probe_cosine(self) -> float:
        """The fidelity gate's figure: this graph at this precision against the stored float32 vectors."""
        items = self.tokenize(self.pipeline.probes, "")
        reference = self.pipeline.reference
        return probe_worst_cosine(
            lambda rows: self.forward([items[i] for i in rows]),
            lambda rows: reference[list(rows)],
            [item.length for item in items],
        )


def load_openvino(
    source: str,
    *,
    dtype: str,
    max_seq_length: int | None,
    threads: int,
    cache_dir: Path | None,
    fidelity_min_cosine: float,
    trust_remote_code: bool = False,
) -> EmbeddingBackend:
    """The ``runtime: openvino`` model: from its cache entry when there is one, else converted (and
    cached); served by OpenVINO if it passes the fidelity gate, else by sentence-transformers in float32."""
    started = time.perf_counter()
    precision = resolve_precision(dtype, on_gpu=False)
    if precision.note:
        log.info("%s: %s", source, precision.note)
    entry = _entry(source, max_seq_length, cache_dir)
    pipeline = read_pipeline(entry) if entry is not None else None
    how = f"read from {entry}"
    exact = None
    load_seconds = {}
    if pipeline is None:
        exact = _exact(source, max_seq_length, threads, trust_remote_code)
        load_seconds.update(exact.load_seconds)
        converting = time.perf_counter()
        pipeline, how = _convert_and_cache(exact, source, max_seq_length, cache_dir)
        load_seconds["convert"] = time.perf_counter() - converting
        if pipeline is None:
            note = f"{how}: serving torch float32"
            log.warning("%s: %s", source, note)
            exact.serving = ServingPath("torch", "float32", None, note)
            return exact
    # The fastest path that holds the bound: OpenVINO at the configured precision, OpenVINO float32, then
    # torch float32 (the reference itself).
    tries = [precision]
    if precision.compute != "float32":
        tries.append(Precision("float32", precision.note))
    misses: list[str] = []
    first_worst = None
    for attempt in tries:
        compiling = time.perf_counter()
        backend = OpenVINOBackend(pipeline, precision=attempt, threads=threads, how=how)
        load_seconds[f"openvino {attempt.compute}"] = time.perf_counter() - compiling
        log.info("%s: %s", source, backend.serving_how)
        gating = time.perf_counter()
        worst = backend.worst_probe_cosine()
        load_seconds[f"fidelity gate {attempt.compute}"] = time.perf_counter() - gating
        first_worst = worst if first_worst is None else first_worst
        if worst >= fidelity_min_cosine:
            log.info("%s: serving openvino %s (worst probe cosine %.7f) after %.2f s", source,
                     attempt.compute, worst, time.perf_counter() - started)  # fmt: skip
            note = attempt.note
            if misses:
                note = "; ".join(misses) + f": serving openvino {attempt.compute}"
                log.warning("%s: %s", source, note)
            backend.serving = ServingPath("openvino", attempt.compute, worst, note)
            backend.load_seconds = load_seconds
            return backend
        misses.append(
            f"openvino {attempt.compute} gave worst cosine {worst:.6f} to torch float32 on the "
            f"{len(pipeline.probes)} fidelity probes, below fidelity_min_cosine {fidelity_min_cosine}"
        )
    note = "; ".join(misses) + ": serving torch float32"
    log.warning("%s: %s", source, note)
    if exact is None:
        exact = _exact(source, max_seq_length, threads, trust_remote_code)
    exact.serving = ServingPath("torch", "float32", first_worst, note)
    return exact


def fill_cache(
    source: str,
    *,
    max_seq_length: int | None,
    cache_dir: Path,
    threads: int = 1,
    trust_remote_code: bool = False,
) -> str:
    """Convert and cache the model unless its entry is there already (``deployments/tools/compile_cache.py``);
    what was done, in one line."""
    entry = _entry(source, max_seq_length, cache_dir)
    if entry is not None and (entry / "pipeline.json").exists():
        return f"cached already in {entry}"
    exact = _exact(source, max_seq_length, threads, trust_remote_code)
    pipeline, how = _convert_and_cache(exact, source, max_seq_length, cache_dir)
    return how if pipeline is not None else f"not converted: {how}"


def _convert_and_cache(
    exact: SentenceTransformersBackend, source: str, max_seq_length: int | None, cache_dir: Path | None
) -> tuple[OpenVINOPipeline | None, str]:
    """The loaded model converted and cached, and what was done (for the log line); no pipeline when the
    model has no fast tokenizer."""
    started = time.perf_counter()
    pipeline = _pipeline_of(exact)
    if pipeline is None:
        return None, "runtime openvino needs the model's fast tokenizer"
    how = f"converted in {time.perf_counter() - started:.1f} s"
    return pipeline, how + _save(pipeline, source, max_seq_length, cache_dir)


def _exact(
    source: str, max_seq_length: int | None, threads: int, trust_remote_code: bool
) -> SentenceTransformersBackend:
    """The model in sentence-transformers on torch float32: the reference, and the fallback."""
    from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend

    return SentenceTransformersBackend(
        source, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code, threads=threads
    )


def _entry(source: str, max_seq_length: int | None, cache_dir: Path | None) -> Path | None:
    """Where this model's entry lives in ``cache_dir``; None without a cache or local files to key by."""
    if cache_dir is None:
        return None
    model_dir = local_model_dir(source)
    return cache_dir / entry_key(model_dir, max_seq_length) if model_dir is not None else None


def _save(pipeline: OpenVINOPipeline, source: str, max_seq_length: int | None, cache_dir: Path | None) -> str:
    """Cache a converted pipeline; what happened, for the log line."""
    entry = _entry(source, max_seq_length, cache_dir)  # after loading, a hub id's files are local
    if entry is None:
        return (
            ", not cached (" + ("no compile_cache_dir" if cache_dir is None else "no local model files") + ")"
        )
    try:
        save_pipeline(pipeline, entry)
    except OSError as exc:
        log.warning("OpenVINO model not cached (cache_dir %s: %s); it is converted at every start",
                    cache_dir, exc)  # fmt: skip
        return ", not cached"
    return f", cached in {entry}"


def _pipeline_of(model: SentenceTransformersBackend) -> OpenVINOPipeline | None:
    """A loaded ``SentenceTransformersBackend`` converted, with its reference probe vectors; None when it
    has no direct tokenizer (the compiled path tokenises without transformers)."""
    tokenizer = model.direct_tokenizer
    if tokenizer is None:
        return None
    example = pad_arrays(model.tokenize(probe_texts(8)[:3], ""), model.pad_values)
    probes = model.probes
    reference = np.concatenate([model.forward(model.tokenize([text], "")) for text in probes])
    return OpenVINOPipeline(
        model=convert(model.model, example),
        tokenizer_json=tokenizer.tokenizer_json,
        input_names=list(tokenizer.feature_names),
        pad_token_id=int(model.pad_values["input_ids"]),
        dimension=model.dimension,
        max_seq_length=model.max_seq_length,
        probes=probes,
        reference=reference.astype(np.float32),
    )
