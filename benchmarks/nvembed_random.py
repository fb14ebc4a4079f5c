"""NV-Embed-v2 models for tests and benchmarks, not for serving: the architecture at its published sizes
(``FULL_SIZE``) with random weights made straight on a device (``random_nvembed``). Kept out of the
production model file (``deployments/engine/backends/nvembed_model.py``)."""

from __future__ import annotations

import torch
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

from deployments.engine.backends.nvembed_model import NVEmbedConfig, NVEmbedModel

# Values drawn for ``random_nvembed``'s weights (2^22: 8 MB in bf16), reused at random offsets.
RANDOM_POOL = 1 << 22


def random_nvembed(
    config: NVEmbedConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> NVEmbedModel:
    """The architecture with random weights made directly on ``device`` in ``dtype`` (benchmarks, tests): the
    dtype is set while the model is still on the meta device, so no float32 copy is ever allocated.

    Weights are N(0, 0.02) draws from a pool of ``RANDOM_POOL`` values, each chunk of a parameter taken at
    its own offset of the pool: drawing a billion normals one by one took 16 s on a CPU, and a pass's
    speed and numerics do not depend on the values beyond their scale."""
    config.text._attn_implementation = "nvembed"
    with torch.device("meta"):
        model = NVEmbedModel(config).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    pool = torch.empty(RANDOM_POOL, device=device, dtype=torch.float32).normal_(
        0.0, 0.02, generator=generator
    )
    pool = torch.cat([pool, pool]).to(dtype)  # twice over: any offset has RANDOM_POOL values after it
    offsets = torch.randint(0, RANDOM_POOL, (1 << 16,), generator=generator, device=device).tolist()
    with torch.no_grad():
        chunk = 0
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "norm_context.weight")):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                flat = param.view(-1)
                for start in range(0, flat.numel(), RANDOM_POOL):
                    n = min(RANDOM_POOL, flat.numel() - start)
                    offset = offsets[chunk % len(offsets)]
                    flat[start : start + n].copy_(pool[offset : offset + n])
                    chunk += 1
    with torch.device(device):
        model.embedding_model.rotary_emb = MistralRotaryEmbedding(config=config.text)
    model.latent_attention_model.freeze_latents()  # as build_nvembed does after loading
    return model.eval()


# Published NV-Embed-v2 dimensions (config.json of nvidia/NV-Embed-v2).
FULL_SIZE = {
    "text_config": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "latent_attention_config": {
        "num_latents_value": 512,
        "num_cross_heads": 8,
        "cross_dim_head": 4096,
        "hidden_dim": 4096,
        "latent_dim": 4096,
    },
}
