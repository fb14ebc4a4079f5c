"""NV-Embed-v2 against golden data computed by its published code (tests/fixtures/nvembed-tiny)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deployments.config import Batching, ConfigError, parse_models_config
from deployments.engine.backends import check_backends
from deployments.engine.backends.nvembed import NVEmbedBackend, load_nvembed_tokenizer
from deployments.engine.embedding_engine import EmbeddingEngine, tokenize_capped
from deployments.protocol.errors import ClientError
from deployments.protocol.options import EmbedOptions, EmbedRequest

FIXTURE = Path(__file__).parent / "fixtures" / "nvembed-tiny"
CASES = {c["name"]: c for c in json.loads((FIXTURE / "expected.json").read_text())["cases"]}
GOOD = [name for name, c in CASES.items() if not c.get("reference_returns_nan")]


LAYOUTS = ["padded", "packed"]


def backend_for(case: dict, layout: str = "padded") -> NVEmbedBackend:
    return NVEmbedBackend.load(
        str(FIXTURE),
        device=torch.device("cpu"),
        dtype="float32",
        max_seq_length=case["max_length"],
        packed=layout == "packed",
    )


@pytest.fixture(scope="module")
def backends() -> dict[int, NVEmbedBackend]:
    return {n: backend_for({"max_length": n}) for n in sorted({c["max_length"] for c in CASES.values()})}


@pytest.fixture(scope="module")
def packed_backends() -> dict[int, NVEmbedBackend]:
    """The same checkpoint run packed: inputs concatenated, attention kept inside each text."""
    lengths = sorted({c["max_length"] for c in CASES.values()})
    return {n: backend_for({"max_length": n}, "packed") for n in lengths}


@pytest.mark.parametrize("name", list(CASES))
def test_token_ids_and_pool_masks_are_the_reference(backends, name):
    case = CASES[name]
    backend = backends[case["max_length"]]
    if case.get("reference_returns_nan"):
        with pytest.raises(ClientError, match="leaves nothing to pool"):
            backend.tokenize(case["texts"], case["instruction"])
        return
    items = backend.tokenize(case["texts"], case["instruction"])
    for item, ids, attention, pool in zip(
        items, case["input_ids"], case["attention_mask"], case["pool_mask"], strict=True
    ):
        n = sum(attention)
        assert item.length == n
        assert item.features["input_ids"].tolist() == ids[:n]
        assert item.features["pool_mask"].tolist() == pool[:n]
        assert all(t == 2 for t in ids[n:])  # the reference pads with EOS on the right


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("grouping", ["all_at_once", "one_by_one", "batcher_small_budget"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_embeddings_match_the_reference(backends, packed_backends, name, grouping, layout):
    case = CASES[name]
    backend = (packed_backends if layout == "packed" else backends)[case["max_length"]]
    assert backend.packed == (layout == "packed")
    expected = np.array(case["embeddings"], dtype=np.float64)
    texts, instruction = case["texts"], case["instruction"]
    if grouping == "all_at_once":
        got = np.concatenate([backend.forward(backend.tokenize(texts, instruction))])
    elif grouping == "one_by_one":
        got = np.concatenate([backend.forward(backend.tokenize([t], instruction)) for t in texts])
    else:
        longest = max(it.length for it in backend.tokenize(texts, instruction))
        budget = longest if backend.packed else 2 * longest  # packed: a budget of token sums
        engine = EmbeddingEngine(backend, Batching(max_batch_tokens=budget, max_batch_size=3))
        results = engine.run(
            [EmbedRequest([t], EmbedOptions(prompt=instruction, normalize=False)) for t in texts]
        )
        got = np.concatenate([r.vectors for r in results])
        assert engine.stats()["forward_passes"] > 1
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-4


def test_truncate_false_refuses_what_would_be_cut(backends):
    backend = backends[20]
    with pytest.raises(ClientError, match="input\\[0\\]") as refused:
        tokenize_capped(backend, ["a long text " * 10], "", truncate=False)
    assert refused.value.code == "input_too_long"
    assert len(tokenize_capped(backend, ["short"], "", truncate=False)) == 1
    assert backend.tokenize(["a long text " * 10], "", 21)[0].length == 21  # cut one past: the engine sees it


def models_config(max_seq_length: int, prompts: dict[str, str]):
    return parse_models_config(
        {
            "default_model": "nv",
            "placements": {"cpu": {"num_cpus": 1}},
            "models": [
                {
                    "name": "nv",
                    "source": str(FIXTURE),
                    "backend": "nvembed",
                    "max_seq_length": max_seq_length,
                    "prompts": prompts,
                    "placement": "cpu",
                }
            ],
        }
    )


def test_config_load_refuses_prompts_that_leave_nothing_to_pool():
    query = {"query": CASES["query_instruction_batch"]["instruction"], "passage": ""}
    check_backends(models_config(64, query))
    with pytest.raises(
        ConfigError, match=r"models\[0\] \(nv\)\.prompts\.query: the instruction takes 15 tokens"
    ):
        check_backends(models_config(12, query))
    with pytest.raises(ValueError, match="leaves nothing to pool"):
        NVEmbedBackend.load(
            str(FIXTURE), device=torch.device("cpu"), dtype="float32", max_seq_length=15, prompts=query
        )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda w: w.pop("latent_attention_model.latents"),
            "missing tensors: latent_attention_model.latents",
        ),
        (lambda w: w.update({"embedding_model.extra.weight": torch.zeros(2)}), "unexpected tensor"),
        (
            lambda w: w.update({"embedding_model.norm.weight": torch.zeros(3)}),
            r"embedding_model.norm.weight: checkpoint shape \(3,\) != model \(64,\)",
        ),
    ],
)
def test_mismatched_weights_are_a_load_error(tmp_path, damage, message):
    for f in FIXTURE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = load_file(str(FIXTURE / "model.safetensors"))
    damage(weights)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        NVEmbedBackend.load(str(tmp_path), device=torch.device("cpu"), dtype="float32", max_seq_length=64)


def test_sharded_checkpoints_load(tmp_path):
    for f in FIXTURE.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    weights = load_file(str(FIXTURE / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    case = CASES["query_instruction_batch"]
    backend = NVEmbedBackend.load(
        str(tmp_path), device=torch.device("cpu"), dtype="float32", max_seq_length=4096
    )
    got = backend.forward(backend.tokenize(case["texts"], case["instruction"]))
    assert np.abs(got - np.array(case["embeddings"])).max() <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_load_straight_into_the_requested_dtype(layout):
    """No float32 copy: every parameter arrives in bf16, and the bf16 model still tracks the reference."""
    from deployments.engine.backends.nvembed_model import build_nvembed

    model = build_nvembed(FIXTURE, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    tokenizer = load_nvembed_tokenizer(FIXTURE)
    backend = NVEmbedBackend(model, tokenizer, max_seq_length=4096, packed=layout == "packed")
    case = CASES["query_instruction_batch"]
    got = backend.forward(backend.tokenize(case["texts"], case["instruction"]))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - np.array(case["embeddings"])).max() < 0.05  # bf16 rounding, not a wrong model


def test_the_latents_keys_and_values_are_computed_once_at_load():
    """They depend on no input, so a loaded model holds them (and no longer the 0.54 GB ``to_kv`` weight at
    full size) instead of computing them in every pass; the vectors are those of computing them per pass."""
    from deployments.engine.backends.nvembed_model import NVEmbedConfig, NVEmbedModel, load_nvembed_weights

    case = CASES["query_instruction_batch"]
    frozen = backend_for(case)
    latent = frozen.model.latent_attention_model
    attn = latent.cross_attend_blocks[0]
    assert attn.fn.to_kv is None and attn.norm_context is None and latent.latents is None
    config = frozen.model.config.latent
    head_dim = config.cross_dim_head
    assert (
        latent.latent_keys.shape
        == latent.latent_values.shape
        == (config.num_latents, config.num_cross_heads, head_dim)
    )
    names = {name for name, _ in frozen.model.named_parameters()}
    assert not any("to_kv" in n or n.endswith(".latents") for n in names)

    config = NVEmbedConfig.from_dir(FIXTURE)
    config.text._attn_implementation = "nvembed"
    with torch.device("meta"):
        per_pass = NVEmbedModel(config)
    load_nvembed_weights(per_pass, FIXTURE, torch.device("cpu"), torch.float32)
    assert per_pass.latent_attention_model.latent_keys is None  # not frozen: computed in each pass
    unfrozen = NVEmbedBackend(per_pass.eval(), frozen.tokenizer, max_seq_length=case["max_length"])
    items = frozen.tokenize(case["texts"], case["instruction"])
    assert np.abs(frozen.forward(items) - unfrozen.forward(items)).max() <= 1e-6
    assert np.abs(frozen.forward(items) - np.array(case["embeddings"])).max() < 1e-4


def test_a_packed_layout_that_fails_or_disagrees_is_not_served(monkeypatch):
    backend = backend_for({"max_length": 64})
    real = backend.model.forward_packed

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(backend.model, "forward_packed", broken)
    assert backend.packed_layout_agrees() is False
    monkeypatch.setattr(backend.model, "forward_packed", lambda *a, **k: real(*a, **k).flip(0))
    assert backend.packed_layout_agrees() is False  # rows swapped: the layouts disagree
    monkeypatch.setattr(backend.model, "forward_packed", real)
    assert backend.packed_layout_agrees() is True and backend.packed is False


def test_packing_is_chosen_only_where_flash_attention_serves_it():
    """CPU (and float32 anywhere) stays padded by default; the packed engine pays no padding."""
    from deployments.engine.backends.nvembed_model import flash_varlen_supported

    assert not flash_varlen_supported(torch.device("cpu"), torch.bfloat16)
    default = NVEmbedBackend.load(str(FIXTURE), device=torch.device("cpu"), dtype="float32")
    assert default.packed is False
    assert default.packed_layout_agrees() and default.packed is False  # the load-time self-check
    packed = backend_for({"max_length": 64}, "packed")
    texts = CASES["query_instruction_batch"]["texts"] * 5
    engine = EmbeddingEngine(packed, Batching(max_batch_tokens=64, max_batch_size=8))
    [result] = engine.run([EmbedRequest(texts)])
    stats = engine.stats()
    assert stats["padded_tokens"] == stats["real_tokens"] == int(result.token_counts.sum())
    assert stats["forward_passes"] >= -(-stats["real_tokens"] // 64)


def test_full_size_architecture_has_nv_embed_v2s_parameter_count():
    """Built on the meta device (no memory): 7.85B parameters, 0.74B of them in the latent block."""
    from benchmarks.nvembed_random import FULL_SIZE
    from deployments.engine.backends.nvembed_model import NVEmbedConfig, NVEmbedModel

    raw = json.loads((FIXTURE / "config.json").read_text())
    for section, values in FULL_SIZE.items():
        raw[section] = {**raw[section], **values}
    with torch.device("meta"):
        model = NVEmbedModel(NVEmbedConfig.from_dict(raw))
    total = sum(p.numel() for p in model.parameters()) / 1e9
    latent = sum(p.numel() for p in model.latent_attention_model.parameters()) / 1e9
    assert round(total, 2) == 7.85 and round(latent, 2) == 0.74


def test_full_width_layers_run_in_both_layouts_and_agree():
    """NV-Embed-v2's real widths (4096 hidden, 32 query / 8 key-value heads of 128, 8 latent heads of
    4096, 512 latents) with one decoder layer, random bf16 weights on CPU: both layouts run and agree."""
    from benchmarks.nvembed_random import FULL_SIZE, random_nvembed
    from deployments.engine.backends.nvembed_model import NVEmbedConfig

    raw = json.loads((FIXTURE / "config.json").read_text())
    for section, values in FULL_SIZE.items():
        raw[section] = {**raw[section], **values}
    raw["text_config"]["num_hidden_layers"] = 1
    model = random_nvembed(NVEmbedConfig.from_dict(raw), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    backend = NVEmbedBackend(model, load_nvembed_tokenizer(FIXTURE), max_seq_length=4096)
    texts = ["a short one", "a longer text with several more words in it, to pad the others against", "mid"]
    items = backend.tokenize(texts, CASES["query_instruction_batch"]["instruction"])
    backend.packed = False
    padded = backend.forward(items)
    backend.packed = True
    packed = backend.forward(items)
    assert padded.shape == packed.shape == (3, 4096)
    assert np.isfinite(padded).all() and np.isfinite(packed).all()
    assert np.all((padded * packed).sum(axis=1) > 0.999)  # unit vectors: cosine, bf16 rounding apart
    assert float((padded[0] * padded[1]).sum()) < 0.9  # different texts stay different (0.19 seen)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_a_16_bit_checkpoint_is_served_in_bf16_on_a_cpu_without_a_float32_copy(tmp_path, stored):
    """The published case (float16 shards) and a bf16 one, `dtype: bfloat16`, a CPU replica. The weights
    arrive tensor by tensor in bf16 (7.85B in float32 would not fit the hosts NV-Embed runs on beside its
    16-bit copy), read into memory the process owns: no file of the checkpoint stays mapped (a tensor of
    safetensors' memory map kept the file's pages resident beside everything else)."""
    for f in FIXTURE.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    weights = {k: v.to(stored) for k, v in load_file(str(FIXTURE / "model.safetensors")).items()}
    save_file(weights, str(tmp_path / "model.safetensors"))
    backend = NVEmbedBackend.load(str(tmp_path), device=torch.device("cpu"), dtype="bfloat16")
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    assert (backend.serving.runtime, backend.serving.precision) == ("torch", "bfloat16")
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path) not in maps  # nothing of the checkpoint mapped: its pages are not held twice
    case = CASES["query_instruction_batch"]
    got = backend.forward(backend.tokenize(case["texts"], case["instruction"]))
    assert np.isfinite(got).all() and np.abs(got - np.array(case["embeddings"])).max() < 0.05


def test_the_latent_block_runs_long_inputs_in_chunks_with_the_same_result(monkeypatch):
    """Chunking the per-token latent block bounds a long pass's memory and changes no vector."""
    from deployments.engine.backends import nvembed_model

    backend = NVEmbedBackend.load(str(FIXTURE), device=torch.device("cpu"), dtype="float32")
    items = backend.tokenize(["knowledge tree " * 700, "Marie Curie", "a third text of a few words"], "")
    assert max(it.length for it in items) > nvembed_model.LATENT_TOKEN_CHUNK
    chunked = backend.forward(items)
    monkeypatch.setattr(nvembed_model, "LATENT_TOKEN_CHUNK", 1 << 20)
    whole = backend.forward(items)
    assert np.abs(chunked - whole).max() <= 1e-6


def test_a_cpu_replica_caps_the_matmul_librarys_primitive_cache(monkeypatch):
    """oneDNN's cache of compiled primitives (one set per pass shape, ~14 MB each at full size) is capped
    before the first pass of a CPU replica; an operator's own value is kept. Its effect on memory and speed
    at full size: benchmarks/full_size_nvembed.py, docs/nvembed.md."""
    from deployments.engine.backends.nvembed import CPU_PRIMITIVE_CACHE, ONEDNN_CACHE_ENV

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    NVEmbedBackend.load(str(FIXTURE), device=torch.device("cpu"), dtype="float32")
    assert os.environ[ONEDNN_CACHE_ENV] == str(CPU_PRIMITIVE_CACHE)
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "64")
    NVEmbedBackend.load(str(FIXTURE), device=torch.device("cpu"), dtype="float32")
    assert os.environ[ONEDNN_CACHE_ENV] == "64"
