"""The OpenVINO runtime for a sentence-transformers model's transformer, on CPU.

Only the transformer (the model's first module, which turns token ids into token embeddings) is
compiled; tokenisation, pooling and normalisation stay the model's own torch modules. The module is
converted once (``openvino.convert_model``, traced from the loaded torch module: no optimum, so no pin
on torch or transformers), with dynamic batch and sequence dimensions, and compiled for this replica's
CPU threads at the pass's precision (``INFERENCE_PRECISION_HINT``: bf16 or f32).

The converted model is kept on disk between starts, under a key made of the weights, the model's
config and the OpenVINO version, so a changed checkpoint or upgrade converts again. A cache directory
that cannot be written costs a log line and a conversion at every start, never a failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OV_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
# Kernels OpenVINO's CPU plugin keeps per input shape (default 5000). Every (rows, length) of a pass is a
# new shape, so with the default a replica's memory grew ~0.3 MB a pass for hours (measured: 734 -> 1,576
# MB over 1,500 passes of random shapes; with 100: 1,018 -> 1,085 after the first 250).
RUNTIME_CACHE_CAPACITY = 100


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeError(
            "runtime: openvino needs the openvino package on this node: pip install -e '.[openvino]'"
        ) from exc
    return openvino


class _TokenEmbeddings(torch.nn.Module):
    """The model's transformer module as a function of tensors, returning token embeddings only."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        return self.transformer(features)["token_embeddings"]


def cache_key(transformer: torch.nn.Module, input_names: list[str]) -> str:
    """Hex digest of what the converted model depends on: OpenVINO's version, the inputs, the module's
    class and config, and every weight's bytes."""
    digest = hashlib.sha256()
    digest.update(_openvino().get_version().encode())
    digest.update(",".join(input_names).encode())
    digest.update(type(transformer).__qualname__.encode())
    config = getattr(getattr(transformer, "model", None), "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in transformer.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def _convert(transformer: torch.nn.Module, example: dict[str, torch.Tensor]):
    ov = _openvino()
    with torch.no_grad():
        model = ov.convert_model(_TokenEmbeddings(transformer).eval(), example_input=example)
    model.reshape({inp.get_any_name(): ov.PartialShape([-1, -1]) for inp in model.inputs})
    return model


def _save(model, cache_dir: Path, key: str) -> None:
    """Write the model under ``cache_dir/key`` atomically (a concurrent writer's copy wins the race)."""
    ov = _openvino()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
        os.replace(staging, cache_dir / key)
    except OSError:
        if not (cache_dir / key / "model.xml").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(transformer: torch.nn.Module, example: dict[str, torch.Tensor], cache_dir: Path | None):
    """The converted model, from ``cache_dir`` when converted before; and how it was obtained."""
    ov = _openvino()
    key = cache_key(transformer, list(example))
    cached = cache_dir / key / "model.xml" if cache_dir is not None else None
    if cached is not None and cached.exists():
        try:
            return ov.Core().read_model(str(cached)), f"read from {cached.parent}"
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is converted again
            log.warning("OpenVINO cache entry %s unreadable (%s): converting again", cached.parent, exc)
    started = time.perf_counter()
    model = _convert(transformer, example)
    how = f"converted in {time.perf_counter() - started:.1f} s"
    if cache_dir is not None:
        try:
            _save(model, cache_dir, key)
            how += f", cached in {cache_dir / key}"
        except OSError as exc:
            log.warning("OpenVINO model not cached (cache_dir %s: %s); it is converted at every start",
                        cache_dir, exc)  # fmt: skip
            how += ", not cached"
    return model, how


class OpenVINOTransformer:
    """Token embeddings [rows, longest, hidden] for a padded batch, computed by OpenVINO on CPU. Called
    from one thread at a time (the replica's model thread)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        example: dict[str, torch.Tensor],
        *,
        precision: str,
        threads: int,
        cache_dir: Path | None,
    ):
        ov = _openvino()
        model, self.how = load_model(transformer, example, cache_dir)
        compiled = ov.Core().compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
                "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY,
            },
        )
        self.input_names = [inp.get_any_name() for inp in compiled.inputs]
        self._output = compiled.outputs[0]
        self._request = compiled.create_infer_request()
        self._compiled = compiled

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = self._request.infer({name: batch[name].numpy() for name in self.input_names})
        return torch.from_numpy(outputs[self._output])
