"""An encoder's attention mask made without reading the device on the host.

transformers 5 turns an encoder's 2-D padding mask into the 4-D mask its attention takes, and first asks
the device whether any token is padded (``padding_mask.all()`` in ``masking_utils``), so that sdpa can
take its unmasked kernel when none is. On CUDA that read waits for every pass queued before it: a launch
cannot queue its kernels behind the pass running, and the GPU idles while the host queues them. The host
already knows from the texts' lengths whether any row is padded. With none, the encoder is given no mask,
which is what transformers does after its read; with some, the mask transformers would build, built by its
own function with that read turned off. An encoder returns a 4-D mask as it is given (or None) without
looking at it, so its pass makes no read.
"""

from __future__ import annotations

import torch


def attention_mask_for(
    config: object, padding_mask: torch.Tensor, dtype: torch.dtype, padded: bool
) -> torch.Tensor | None:
    """The mask to hand an encoder in place of ``padding_mask`` [rows, length] (1 = a token): None where no
    row is ``padded``, else the 4-D mask of the encoder's attention implementation (``config``'s) in
    ``dtype``, the dtype of the encoder's hidden states (an eager attention's mask is additive in it)."""
    if not padded:
        return None
    from transformers.masking_utils import create_bidirectional_mask

    # The function reads only the hidden states' shape, dtype and device: an empty stand-in serves.
    like = torch.empty((*padding_mask.shape, 0), dtype=dtype, device=padding_mask.device)
    return create_bidirectional_mask(
        config=config, inputs_embeds=like, attention_mask=padding_mask, allow_is_bidirectional_skip=False
    )
