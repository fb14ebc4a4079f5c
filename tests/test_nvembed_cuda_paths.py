"""The CUDA branches of NV-Embed-v2, checked on CPU (CI has no GPU): the packed path's Flash Attention
branch run through a reference variable-length attention (one call, block-diagonal mask) against the
golden fixture; the full-size model built on the meta device, every tensor against the published layout,
nothing allocated; sizing.py's estimate against that tally; a full-size pass of each layout traced on the
meta device (no host read of a device value); and, on a GPU only, a launch under CUDA's sync debug mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.nvembed_random import FULL_SIZE
from deployments.config import load_models_config
from deployments.engine.backends import nvembed_model
from deployments.engine.backends.nvembed import NVEmbedBackend, load_nvembed_tokenizer
from deployments.engine.backends.nvembed_model import NVEmbedConfig, NVEmbedModel, build_nvembed
from deployments.engine.sizing import BYTES, KNOWN_SIZES, replica_gpu_memory_gb
from tests.cuda_launch import launch_without_sync

# Not from tests.conftest: the GPU check runs this file with --noconftest (its image lacks MiniLM's package).
REPO = Path(__file__).resolve().parent.parent

FIXTURE = Path(__file__).parent / "fixtures" / "nvembed-tiny"
CASES = [c for c in json.loads((FIXTURE / "expected.json").read_text())["cases"] if "embeddings" in c]
# nvidia/NV-Embed-v2 as published: 7,851,016,192 parameters, 15,702,032,384 bytes in 16-bit.
PUBLISHED_PARAMETERS = 7_851_016_192


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa: bool = False):
    """What Flash Attention's varlen kernel computes, written plainly: one attention over the whole packed
    run, each token seeing only the tokens of its own text (a block-diagonal mask). q [T, H, D]."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    text_of = torch.repeat_interleave(torch.arange(len(cu_q) - 1), (cu_q[1:] - cu_q[:-1]).long())
    mask = text_of[:, None] == text_of[None, :]
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "grouped key/value heads without enable_gqa"
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask)
    reference_varlen.calls += 1
    return out.transpose(0, 1)


reference_varlen.calls = 0


@pytest.mark.parametrize("gqa_in_kernel", [True, False], ids=["kernel-gqa", "repeated-kv"])
def test_the_flash_branch_of_the_packed_path_matches_the_golden_fixture(monkeypatch, gqa_in_kernel):
    monkeypatch.setattr(nvembed_model, "varlen_attn", reference_varlen)
    monkeypatch.setattr(nvembed_model, "flash_varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(nvembed_model, "_VARLEN_HAS_GQA", gqa_in_kernel)
    model = build_nvembed(FIXTURE, torch.device("cpu"), torch.float32)
    backend = NVEmbedBackend(model, load_nvembed_tokenizer(FIXTURE), packed=True)
    before = reference_varlen.calls
    worst = 0.0
    for case in CASES:
        if case.get("reference_returns_nan"):
            continue
        backend.max_seq_length = case["max_length"]
        got = backend.forward(backend.tokenize(case["texts"], case["instruction"]))
        worst = max(worst, float(np.abs(got - np.array(case["embeddings"])).max()))
    assert reference_varlen.calls > before  # the Flash branch ran, not the per-text fallback
    assert worst <= 1e-4


def published_layout() -> dict[str, tuple[int, ...]]:
    """Every tensor of nvidia/NV-Embed-v2's checkpoint and its shape, from the published architecture:
    Mistral-7B's decoder (no lm_head) and the latent-attention block."""
    d, kv, ffn, vocab = 4096, 1024, 14336, 32000
    layout: dict[str, tuple[int, ...]] = {"embedding_model.embed_tokens.weight": (vocab, d)}
    for n in range(32):
        p = f"embedding_model.layers.{n}."
        layout.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    layout["embedding_model.norm.weight"] = (d,)
    inner = 8 * 4096  # 8 cross-attention heads of 4096
    b0, b1 = "latent_attention_model.cross_attend_blocks.0.", "latent_attention_model.cross_attend_blocks.1."
    layout.update({
        "latent_attention_model.latents": (512, d),
        b0 + "norm.weight": (d,), b0 + "norm.bias": (d,),
        b0 + "norm_context.weight": (d,), b0 + "norm_context.bias": (d,),
        b0 + "fn.to_q.weight": (inner, d), b0 + "fn.to_kv.weight": (2 * inner, d),
        b0 + "fn.to_out.weight": (d, inner),
        b1 + "norm.weight": (d,), b1 + "norm.bias": (d,),
        b1 + "fn.net.0.weight": (2 * 4 * d, d), b1 + "fn.net.0.bias": (2 * 4 * d,),  # GEGLU: two halves
        b1 + "fn.net.2.weight": (d, 4 * d), b1 + "fn.net.2.bias": (d,),
    })  # fmt: skip
    return layout


def full_size_on_meta(dtype: torch.dtype) -> NVEmbedModel:
    raw = json.loads((FIXTURE / "config.json").read_text())
    for section, values in FULL_SIZE.items():
        raw[section] = {**raw[section], **values}
    with torch.device("meta"):
        return NVEmbedModel(NVEmbedConfig.from_dict(raw)).to(dtype)


def test_the_full_size_model_on_the_meta_device_has_the_published_layout_and_allocates_nothing():
    model = full_size_on_meta(torch.bfloat16)
    params = dict(model.named_parameters())
    layout = published_layout()
    assert set(params) == set(layout)
    for name, param in params.items():
        assert tuple(param.shape) == layout[name], name
        assert param.dtype == torch.bfloat16 and param.device.type == "meta", name
    assert all(b.device.type == "meta" for b in model.buffers())
    total = sum(int(np.prod(shape)) for shape in layout.values())
    assert total == sum(p.numel() for p in params.values()) == PUBLISHED_PARAMETERS
    assert sum(p.numel() * p.element_size() for p in params.values()) == 15_702_032_384


def test_sizing_estimates_nv_embed_v2_from_the_real_architecture():
    """sizing.py's parameter count is the meta-device tally's, and a replica's estimate covers its weights
    with the stated slack (10%), bounded above by that plus context and a generous activation allowance."""
    tally = sum(p.numel() for p in full_size_on_meta(torch.bfloat16).parameters())
    known = KNOWN_SIZES["nvidia/NV-Embed-v2"]
    assert abs(known.params_billion * 1e9 - tally) / tally < 1e-3
    config = load_models_config(REPO / "configs/models.yaml")
    entry = next(e for e in config.models if e.source == "nvidia/NV-Embed-v2")
    weights_gb = tally * BYTES[entry.dtype] / 1e9
    estimate = replica_gpu_memory_gb(entry)
    assert estimate is not None and weights_gb * 1.1 < estimate < weights_gb * 1.1 + 0.5 + 12


def meta_varlen(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa: bool = False):
    """Flash Attention's varlen call on the meta device: the shapes it is given checked, its output made.
    (The kernel's arithmetic is ``reference_varlen``'s test above; this one is about what surrounds it.)"""
    assert q.shape[0] == k.shape[0] and cu_q.shape == cu_k.shape and isinstance(max_q, int)
    assert k.shape[1] == (q.shape[1] // 4 if enable_gqa else q.shape[1])  # 32 query heads, 8 key/value heads
    meta_varlen.calls += 1
    return torch.empty_like(q)


meta_varlen.calls = 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_full_size_pass_traced_on_the_meta_device_never_reads_the_device_on_the_host(monkeypatch, packed):
    """Both layouts of a full-size NV-Embed-v2 pass run on the meta device (shapes only, nothing allocated):
    every tensor of the 32 layers and the latent block fits its neighbour, the output is [texts, 4096], and
    no step reads a device value on the host. A meta tensor has no values, so such a read raises here; on
    CUDA it would wait for every pass queued before this one and leave the GPU idle between passes
    (``bool(mask.all())`` in the padded layout did). The packed layout goes through the Flash branch."""
    meta_varlen.calls = 0
    if packed:
        monkeypatch.setattr(nvembed_model, "varlen_attn", meta_varlen)
        monkeypatch.setattr(nvembed_model, "flash_varlen_supported", lambda device, dtype: True)
        monkeypatch.setattr(nvembed_model, "_VARLEN_HAS_GQA", True)
    model = full_size_on_meta(torch.bfloat16)
    model.config.text._attn_implementation = "nvembed"
    model.latent_attention_model.freeze_latents()
    backend = NVEmbedBackend(model, load_nvembed_tokenizer(FIXTURE), packed=packed)
    assert backend.device.type == "meta"
    texts = ["Ray Serve", "a longer passage about latent attention pooling over learned latents " * 3, "GPU"]
    for instruction in ("", "Instruct: Given a question, retrieve passages that answer it\nQuery: "):
        items = backend.tokenize(texts, instruction)
        assert len({it.length for it in items}) == 3  # the padded layout pads two of the three rows
        out = backend._embed(items)
        assert out.shape == (3, 4096) and out.dtype == torch.float32 and out.device.type == "meta"
    same = backend.tokenize(["one", "two"], "")
    assert same[0].length == same[1].length and backend._embed(same).shape == (2, 4096)  # no padding at all
    assert meta_varlen.calls == (3 * 32 if packed else 0)  # the Flash branch in every layer of each pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (the GPU check runs it)")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_launching_a_pass_on_cuda_never_synchronizes(packed):
    """On a GPU: launching a pass (inputs copied, kernels queued, the output's copy back queued) makes no
    call that waits for the device (``torch.cuda.set_sync_debug_mode('error')`` raises on one), so the
    scheduler's next launch overlaps the pass running; the result then matches the golden fixture's."""
    if packed and not nvembed_model.flash_varlen_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no Flash Attention varlen kernel here: the packed layout is not served on this GPU")
    model = build_nvembed(FIXTURE, torch.device("cuda"), torch.bfloat16)
    backend = NVEmbedBackend(model, load_nvembed_tokenizer(FIXTURE), packed=packed)
    case = next(c for c in CASES if not c.get("reference_returns_nan") and len(c["texts"]) > 1)
    backend.max_seq_length = case["max_length"]
    items = backend.tokenize(case["texts"], case["instruction"])
    got = launch_without_sync(backend, items)
    expected = np.array(case["embeddings"])
    cosines = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() > 0.99
