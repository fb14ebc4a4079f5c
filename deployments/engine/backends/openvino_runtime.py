"""A sentence-transformers model as one OpenVINO graph, and the on-disk entry that lets a replica serve it
without torch.

The whole model is converted: its own modules (transformer, pooling, optional Normalize), traced by
``openvino.convert_model`` from the loaded torch modules (no optimum, so no pin on torch or transformers),
from token ids to the sentence embedding, with dynamic batch and sequence dimensions. An ``OpenVINOPipeline``
is that graph plus what serving it needs besides: the model's fast tokenizer (serialised), its input
names and pad id, the dimension, ``max_seq_length``, and the torch float32 vectors of the fidelity probes.

It is kept on disk under a key made of the model's files, ``max_seq_length`` and the versions of the
libraries that shaped it. A replica that finds its entry serves from it without importing torch,
transformers or sentence-transformers (5-8 s of a start on 2 cores), and the fidelity gate still compares
the compiled graph with the stored float32 vectors at every load. A cache directory that cannot be written
costs a log line and a conversion at every start, never a failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deployments.engine.backends.model_files import package_versions, update_with_model_files

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bumped whenever what an entry holds or how the graph is traced changes: older entries are not read.
ENTRY_FORMAT = 3  # 3: the probes (fidelity.PROBE_COUNT drawn ones) stored beside their reference
# The libraries whose versions an entry depends on: the graph's tracer and what ran the traced code.
KEY_PACKAGES = ("openvino", "torch", "transformers", "sentence-transformers", "tokenizers")


def openvino_module() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeError(
            "runtime: openvino needs the openvino package on this node: pip install -e '.[openvino]'"
        ) from exc
    return openvino


@dataclass
class OpenVINOPipeline:
    """Everything a replica needs to serve the model with OpenVINO alone."""

    model: Any  # openvino.Model: input_ids, attention_mask [, token_type_ids] -> sentence embedding
    tokenizer_json: str  # the model's fast tokenizer, serialised by the tokenizers library
    input_names: list[str]
    pad_token_id: int
    dimension: int
    max_seq_length: int
    probes: list[str]  # the fidelity probes (fidelity.probe_texts on the model's vocabulary) at conversion
    reference: np.ndarray  # float32 [probes, dimension]: torch float32 on ``probes``, each alone


# ---- the key of a model's entry -----------------------------------------------------------------------
def entry_key(model_dir: Path, max_seq_length: int | None) -> str:
    """Hex digest of what an entry depends on: its format, the library versions, ``max_seq_length`` and
    every file of the model (``model_files.update_with_model_files``)."""
    digest = hashlib.sha256()
    digest.update(f"format {ENTRY_FORMAT}; max_seq_length {max_seq_length}; ".encode())
    digest.update(package_versions(KEY_PACKAGES).encode())
    update_with_model_files(digest, model_dir)
    return digest.hexdigest()[:32]


# ---- conversion (needs torch: only on a start that finds no entry) -------------------------------------
def quiet_converter_telemetry() -> None:
    """Keep OpenVINO's converter from sending usage events unless this machine's user opted in.

    ``openvino.convert_model`` sends anonymous events to Google Analytics by default (the documented
    opt-out is ``opt_in_out --opt_out``); nobody on a serving node was asked, and each event forks the
    replica (measured: 3.5 -> 1.5 s for MiniLM's conversion, offline). The converter's telemetry object is
    a process-wide singleton, so configuring it first with consent off holds for the conversion. One event
    remains: the converter's module sends it as it is imported, before any setting can hold (a start that
    reads its cache entry never imports it). An explicit opt-in (``opt_in_out --opt_in``) is kept.
    Without the telemetry package: nothing to do."""
    try:
        from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return
    if OptInChecker().check(enable_opt_in_dialog=False) != ConsentCheckResult.ACCEPTED:
        init_ovc_telemetry().consent = False


def convert(modules: torch.nn.Module, example: dict[str, np.ndarray]) -> Any:
    """The model's modules (a ``SentenceTransformer``) as an OpenVINO graph with dynamic [rows, tokens]
    inputs, traced on ``example``."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.inner(features)["sentence_embedding"]

    ov = openvino_module()
    quiet_converter_telemetry()
    tensors = {k: torch.from_numpy(v) for k, v in example.items()}
    with torch.no_grad(), warnings.catch_warnings():
        # Pooling asks whether the mask is as long as the token embeddings; the tracer keeps the answer
        # (yes) as a constant, which holds for every batch: the mask is padded with the ids.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(SentenceEmbedding(modules).eval(), example_input=tensors)
    model.reshape({inp.get_any_name(): ov.PartialShape([-1, -1]) for inp in model.inputs})
    return model


# ---- the entry on disk ---------------------------------------------------------------------------------
def save_pipeline(pipeline: OpenVINOPipeline, entry: Path) -> None:
    """Write the entry atomically (a concurrent writer's copy wins the race)."""
    ov = openvino_module()
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        ov.save_model(pipeline.model, str(staging / "model.xml"), compress_to_fp16=False)
        (staging / "tokenizer.json").write_text(pipeline.tokenizer_json)
        np.save(staging / "reference.npy", pipeline.reference)
        (staging / "probes.json").write_text(json.dumps(pipeline.probes, ensure_ascii=False))
        meta = {
            "input_names": pipeline.input_names,
            "pad_token_id": pipeline.pad_token_id,
            "dimension": pipeline.dimension,
            "max_seq_length": pipeline.max_seq_length,
        }
        (staging / "pipeline.json").write_text(json.dumps(meta))  # written last: marks a whole entry
        os.replace(staging, entry)
    except OSError:
        if not (entry / "pipeline.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_pipeline(entry: Path) -> OpenVINOPipeline | None:
    """The entry's pipeline; None when there is none. A damaged entry is a log line (and converts again)."""
    if not (entry / "pipeline.json").exists():
        return None
    try:
        meta = json.loads((entry / "pipeline.json").read_text())
        return OpenVINOPipeline(
            model=openvino_module().Core().read_model(str(entry / "model.xml")),
            tokenizer_json=(entry / "tokenizer.json").read_text(),
            input_names=list(meta["input_names"]),
            pad_token_id=int(meta["pad_token_id"]),
            dimension=int(meta["dimension"]),
            max_seq_length=int(meta["max_seq_length"]),
            probes=json.loads((entry / "probes.json").read_text()),
            reference=np.load(entry / "reference.npy"),
        )
    except Exception as exc:  # noqa: BLE001 - a damaged entry is converted again
        log.warning("OpenVINO cache entry %s unreadable (%s): converting again", entry, exc)
        _discard(entry)
        return None


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way (a rename is atomic: no reader sees it half deleted), so the
    conversion's entry can take its place."""
    aside = entry.with_name(f".damaged-{entry.name}-{os.getpid()}")
    try:
        os.replace(entry, aside)
    except OSError:
        return  # gone already, or not ours to move: the new entry is then kept in memory only
    shutil.rmtree(aside, ignore_errors=True)
