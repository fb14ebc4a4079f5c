"""NV-Embed-v2 (nvidia/NV-Embed-v2) as plain torch modules on current transformers, no remote code.

Reproduces the published ``modeling_nvembed.py`` (run under transformers 4.42, the version its card pins):

- ``embedding_model``: Mistral-7B's decoder made bidirectional. Built from transformers' own
  ``MistralDecoderLayer`` / ``MistralRMSNorm`` / ``MistralRotaryEmbedding``, driven by our loop with a
  padding-only 4-D additive mask (padded keys hidden, no causal triangle, no sliding window). The
  published trick of setting ``is_causal = False`` on each layer no longer does this on transformers 5
  (``MistralModel`` builds a causal mask from a 2-D mask), hence our own loop.
- ``latent_attention_model``: the token states are queries over 512 learned latents (keys and values),
  ``h + to_out(attn(to_q(LN(h)), to_kv(LN_ctx(latents))))``, then ``h + FF(LN(h))`` with
  ``Linear(d, 8d) -> GEGLU -> Linear(4d, d)``; then the mean over the pooling mask and L2 normalisation.
  The latents' keys and values depend on no input: they are computed once after loading
  (``freeze_latents``), not in every pass.

Two layouts of the same computation. Padded: ``[rows, longest]`` with the padding-only mask, on every
device. Packed: the micro-batch's tokens concatenated into one ``[tokens]`` run, positions restarting at 0
per text, self-attention kept inside each text by cumulative lengths (``torch.nn.attention.varlen``, Flash
Attention, on CUDA in half precision; one ``sdpa`` call per text elsewhere). Every other layer acts on
each token alone, so packing changes no result and spends nothing on padding.

Module names mirror the checkpoint's keys (``embedding_model.*``, ``latent_attention_model.*``), and
``load_nvembed_weights`` checks every name and shape: a missing, unknown or mis-shaped tensor is an error,
never silently random weights.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, MistralConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

from deployments.engine.backends.safetensors_files import checkpoint_shards, iter_tensors

_TEXT_CONFIG_IGNORED = {"model_type", "_name_or_path", "architectures", "torch_dtype", "dtype", "auto_map"}

try:  # torch >= 2.9; CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None
_VARLEN_HAS_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters


@functools.cache
def flash_varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed attention can run as one Flash Attention call (CUDA, sm80+, half precision)."""
    return (
        varlen_attn is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Bidirectional attention within each text of a packed run: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D].

    ``cu_seqlens`` (int32 [texts + 1]) holds where each text starts; scale 1/sqrt(D), as Mistral's."""
    groups = q.shape[1] // k.shape[1]
    flash = flash_varlen_supported(q.device, q.dtype)
    native_gqa = flash and groups > 1 and _VARLEN_HAS_GQA
    if groups > 1 and not native_gqa:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if flash:
        extra = {"enable_gqa": True} if native_gqa else {}
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **extra)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        per_text = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, n, D]
        out[start:end] = F.scaled_dot_product_attention(*per_text).transpose(0, 1)
    return out


def _nvembed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention transformers' Mistral layers call: packed when given cumulative lengths, else sdpa."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    return packed_attention(q, k, v, cu_seq_lens_q, max_length_q).unsqueeze(0), None


AttentionInterface.register("nvembed", _nvembed_attention)


@dataclass(frozen=True)
class LatentAttentionConfig:
    num_latents: int
    latent_dim: int
    hidden_dim: int
    num_cross_heads: int
    cross_dim_head: int
    output_normalize: bool = True


@dataclass(frozen=True)
class NVEmbedConfig:
    """What ``config.json`` of an NV-Embed checkpoint says, in the published format."""

    text: MistralConfig
    latent: LatentAttentionConfig
    padding_side: str
    is_mask_instruction: bool
    add_eos: bool

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NVEmbedConfig:
        text = dict(raw["text_config"])
        if text.get("model_type") not in ("bidir_mistral", "mistral"):
            raise ValueError(f"text_config.model_type {text.get('model_type')!r}: expected 'bidir_mistral'")
        mistral = MistralConfig(**{k: v for k, v in text.items() if k not in _TEXT_CONFIG_IGNORED})
        la = raw["latent_attention_config"]
        latent = LatentAttentionConfig(
            num_latents=la["num_latents_value"],
            latent_dim=la["latent_dim"],
            hidden_dim=la["hidden_dim"],
            num_cross_heads=la["num_cross_heads"],
            cross_dim_head=la["cross_dim_head"],
            output_normalize=la.get("output_normalize", True),
        )
        if not latent.hidden_dim == latent.latent_dim == mistral.hidden_size:
            raise ValueError(
                "latent_attention_config: hidden_dim, latent_dim and text_config.hidden_size must be equal "
                f"(got {latent.hidden_dim}, {latent.latent_dim}, {mistral.hidden_size})"
            )
        return cls(
            text=mistral,
            latent=latent,
            padding_side=raw.get("padding_side", "right"),
            is_mask_instruction=raw.get("is_mask_instruction", True),
            add_eos=raw.get("add_eos", True),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> NVEmbedConfig:
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


class BidirectionalMistral(nn.Module):
    """Mistral's decoder stack, every token seeing every non-padding token."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MistralRotaryEmbedding(config=config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Padded layout: [rows, longest] ids and 0/1 attention mask -> [rows, longest, hidden].

        ``attention_mask`` None: no row is padded (sdpa then runs without a mask, on its fastest kernels).
        The caller says so from its host-side lengths; the mask is never read here, since reading a device
        tensor on the host (``bool(mask.all())``) waits for every pass queued before this one."""
        hidden = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        rope = self.rotary_emb(hidden, position_ids=positions)
        mask = None if attention_mask is None else self._padding_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            if isinstance(hidden, tuple):  # older transformers return (hidden,)
                hidden = hidden[0]
        return self.norm(hidden)

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        """Packed layout: [tokens] ids, per-text positions and cumulative lengths -> [tokens, hidden]."""
        hidden = self.embed_tokens(input_ids).unsqueeze(0)
        positions = position_ids.unsqueeze(0)
        rope = self.rotary_emb(hidden, position_ids=positions)
        packing = {"cu_seq_lens_q": cu_seqlens, "max_length_q": max_len}
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=None, position_ids=positions, position_embeddings=rope, **packing
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return self.norm(hidden)[0]

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive [rows, 1, 1, longest], broadcast over heads and queries: 0 where the key is a real token,
        the dtype's minimum where it is padding. Never an L x L tensor. Its rows are allocated 8-aligned
        (then sliced): sdpa's memory-efficient kernel copies an unaligned mask into a padded
        [rows, heads, L, L] one, which for long inputs is gigabytes per layer."""
        rows, longest = attention_mask.shape
        buffer = torch.zeros(rows, -(-longest // 8) * 8, dtype=dtype, device=attention_mask.device)
        buffer[:, :longest].masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
        return buffer[:, None, None, :longest]


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv: nn.Linear | None = nn.Linear(dim, inner * 2, bias=False)  # None once frozen
        self.to_out = nn.Linear(inner, dim, bias=False)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys and values, each [m, h, dh]."""
        assert self.to_kv is not None, "keys_values after the latents were frozen"
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return k.reshape(k.shape[0], self.heads, -1), v.reshape(v.shape[0], self.heads, -1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x [b, n, d] attends to the shared keys and values [m, h, dh], never expanded to the batch: with 8
        heads of 4096 that copy would be b x 32 MB."""
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1)  # [b, n, h, dh]
        scores = torch.einsum("bnhd,mhd->bhnm", q, k) * q.shape[-1] ** -0.5
        weights = scores.float().softmax(dim=-1).to(q.dtype)
        out = torch.einsum("bhnm,mhd->bnhd", weights, v)
        return self.to_out(out.reshape(b, n, -1))


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None


# Tokens the latent-attention block takes at once (it acts on each token alone, so chunks change nothing
# but the peak memory of a long pass).
LATENT_TOKEN_CHUNK = 1024


class LatentAttentionPooling(nn.Module):
    """Cross-attention from token states to learned latents, feed-forward, then masked mean."""

    def __init__(self, config: LatentAttentionConfig):
        super().__init__()
        d = config.hidden_dim
        self.normalize = config.output_normalize
        self.latents = nn.Parameter(torch.empty(config.num_latents, config.latent_dim))
        self.cross_attend_blocks = nn.ModuleList(
            [
                _PreNorm(d, _CrossAttention(d, config.num_cross_heads, config.cross_dim_head), context_dim=d),
                _PreNorm(d, _FeedForward(d)),
            ]
        )
        # The latents' keys and values once frozen (``freeze_latents``); computed per chunk until then.
        self.register_buffer("latent_keys", None, persistent=False)
        self.register_buffer("latent_values", None, persistent=False)

    @torch.no_grad()
    def freeze_latents(self) -> None:
        """Compute the latents' keys and values once, after the weights load, and drop what made them.

        They depend on no input: ``to_kv(LN_ctx(latents))`` is the same in every pass. Computed per chunk,
        that is a 512 x 4096 x 65536 matmul (275 GFLOP, as much as ~20 tokens of Mistral) in every pass, and
        ``to_kv``'s weight holds 0.54 GB in bf16 that nothing else reads. Keeps them as non-persistent
        buffers (they follow ``.to(device)``) in the weights' dtype, as the published code computes them."""
        attn = self.cross_attend_blocks[0]
        keys, values = attn.fn.keys_values(attn.norm_context(self.latents))
        self.latent_keys, self.latent_values = keys.contiguous(), values.contiguous()
        attn.fn.to_kv = None
        attn.norm_context = None
        self.latents = None

    def _latent_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent_keys is not None and self.latent_values is not None:
            return self.latent_keys, self.latent_values
        attn = self.cross_attend_blocks[0]
        return attn.fn.keys_values(attn.norm_context(self.latents))

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cross-attention and feed-forward blocks; each token on its own, in any layout [..., n, d], so
        at most ``LATENT_TOKEN_CHUNK`` tokens go through at a time: the block's 32768-wide projections
        hold 64 KB a token in bf16 (about 0.7 GB of intermediates for one 4,096-token input at once)."""
        shape = hidden.shape
        tokens = hidden.reshape(1, -1, shape[-1])
        if tokens.shape[1] <= LATENT_TOKEN_CHUNK:
            return self._transform_tokens(hidden)
        parts = [self._transform_tokens(part) for part in tokens.split(LATENT_TOKEN_CHUNK, dim=1)]
        return torch.cat(parts, dim=1).reshape(shape)

    def _transform_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        attn, ff = self.cross_attend_blocks
        keys, values = self._latent_keys_values()  # [latents, heads, head dim], shared by the whole batch
        hidden = attn.fn(attn.norm(hidden), keys, values) + hidden
        return ff.fn(ff.norm(hidden)) + hidden

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """Padded: [rows, longest, d] and [rows, longest] pool mask -> float32 [rows, d]."""
        hidden = self._transform(hidden)
        mask = pool_mask.to(hidden.dtype).unsqueeze(-1)
        return self._finish((hidden * mask).sum(dim=1).float() / mask.sum(dim=1).float())

    def forward_packed(
        self, hidden: torch.Tensor, pool_mask: torch.Tensor, text_index: torch.Tensor, texts: int
    ) -> torch.Tensor:
        """Packed: [tokens, d], [tokens] pool mask and owning text -> float32 [texts, d].
        The per-text sums accumulate in float32 (the padded path's bf16 sum rounds once more)."""
        hidden = self._transform(hidden.unsqueeze(0))[0]
        weights = pool_mask.to(torch.float32)
        sums = torch.zeros(texts, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, text_index, hidden.float() * weights[:, None])
        counts = torch.zeros(texts, dtype=torch.float32, device=hidden.device)
        counts.index_add_(0, text_index, weights)
        return self._finish(sums / counts[:, None])


class NVEmbedModel(nn.Module):
    def __init__(self, config: NVEmbedConfig):
        super().__init__()
        self.config = config
        self.embedding_model = BidirectionalMistral(config.text)
        self.latent_attention_model = LatentAttentionPooling(config.latent)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pool_mask: torch.Tensor
    ) -> torch.Tensor:
        """float32 [batch, hidden] embeddings; every row needs at least one position in ``pool_mask``;
        ``attention_mask`` None where no row is padded (``BidirectionalMistral.forward``)."""
        hidden = self.embedding_model(input_ids, attention_mask)
        return self.latent_attention_model(hidden, pool_mask)

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pool_mask: torch.Tensor,
        text_index: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_len: int,
    ) -> torch.Tensor:
        """float32 [texts, hidden] from one packed run of ``len(cu_seqlens) - 1`` texts (see the module)."""
        hidden = self.embedding_model.forward_packed(input_ids, position_ids, cu_seqlens, max_len)
        return self.latent_attention_model.forward_packed(hidden, pool_mask, text_index, len(cu_seqlens) - 1)


def load_nvembed_weights(
    model: NVEmbedModel, path: str | Path, device: torch.device, dtype: torch.dtype
) -> None:
    """Load every checkpoint tensor onto ``device`` in ``dtype``, one tensor at a time.

    The model is expected on the meta device (no memory); parameters are replaced, not copied into, so
    the weights exist once, in ``dtype``: no float32 copy, no memory-mapped file held beside them
    (``safetensors_files``). Names and shapes are checked both ways.
    """
    expected = dict(model.named_parameters())
    seen: set[str] = set()
    problems: list[str] = []
    for file in checkpoint_shards(path):
        for name, tensor in iter_tensors(file, device, dtype):
            if name not in expected:
                problems.append(f"unexpected tensor {name!r} in {file.name}")
                continue
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                problems.append(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {want}")
                continue
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise ValueError(
            f"{path}: checkpoint does not match NV-Embed-v2's layout:\n  " + "\n  ".join(problems)
        )
    # The rotary frequencies are a computed, non-persistent buffer: rebuild it on the real device.
    with torch.device(device):
        model.embedding_model.rotary_emb = MistralRotaryEmbedding(config=model.config.text)


def build_nvembed(path: str | Path, device: torch.device, dtype: torch.dtype) -> NVEmbedModel:
    config = NVEmbedConfig.from_dir(path)
    config.text._attn_implementation = "nvembed"
    with torch.device("meta"):
        model = NVEmbedModel(config)
    load_nvembed_weights(model, path, device, dtype)
    model.latent_attention_model.freeze_latents()
    return model.eval()
