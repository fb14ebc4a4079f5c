"""Device faults on CPU, with the real MiniLM behind backends that raise what CUDA raises, on demand: an
out-of-memory pass runs again split in two under a smaller token budget that is earned back; an input that
cannot fit alone fails only its own caller; a poisoned context fails the open calls, refuses new ones and
fails the health check. The same through a real Serve replica: tests/test_resilience.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.common import short_mix
from deployments.config import Batching
from deployments.engine.backends.fidelity import worst_cosine
from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend
from deployments.engine.device_faults import (
    DeviceFault,
    TokenBudget,
    is_out_of_memory,
    is_poisoned_context,
)
from deployments.engine.embedding_engine import EmbeddingEngine
from deployments.protocol.errors import ModelError
from deployments.protocol.options import EmbedOptions, EmbedRequest
from tests.conftest import MINILM_DIR
from tests.fatal_module import POISONED_CONTEXT

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
    "1.06 GiB is free. Of the allocated memory 74.20 GiB is allocated by PyTorch"
)
OPTIONS = EmbedOptions(prompt="", normalize=True, truncate=True)


def test_device_errors_are_told_apart_by_what_torch_raises():
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_poisoned_context(torch.OutOfMemoryError(CUDA_OOM))
    for message in (
        POISONED_CONTEXT,
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`",
    ):
        assert is_poisoned_context(torch.AcceleratorError(message)), message
        assert not is_out_of_memory(torch.AcceleratorError(message)), message
    for ordinary in (ValueError("bad input"), RuntimeError("shape mismatch"), KeyError("input_ids")):
        assert not is_out_of_memory(ordinary) and not is_poisoned_context(ordinary)


def test_the_budget_halves_on_out_of_memory_and_is_earned_back_step_by_step():
    budget = TokenBudget(4096, floor=256, recover_after=3)
    budget.out_of_memory(3000)
    assert budget.current == 1500
    budget.out_of_memory(8000)  # never above what it was
    assert budget.current == 750
    budget.out_of_memory(300)
    assert budget.current == 256  # the floor: the longest input must fit a pass of its own
    seen = []
    while budget.current < 4096:
        raised = [budget.succeeded() for _ in range(3)]
        assert raised == [False, False, True]
        seen.append(budget.current)
    assert seen == sorted(seen) and seen[-1] == 4096 and len(seen) > 5  # step by step, not at once
    assert not budget.succeeded()


class MemoryLimitedBackend(SentenceTransformersBackend):
    """The real MiniLM on a "device" of ``limit`` padded tokens: a bigger pass raises torch's OOM error."""

    limit: int | None = None
    released = 0

    def forward(self, items):
        padded = len(items) * max(it.length for it in items)
        if self.limit is not None and padded > self.limit:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return super().forward(items)

    def release_memory(self) -> None:
        self.released += 1
        super().release_memory()


def test_out_of_memory_splits_the_pass_shrinks_the_budget_and_fails_only_an_input_too_big_alone(minilm):
    backend = MemoryLimitedBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=256)
    backend.limit = 200  # padded tokens: a 256-token input cannot fit even alone
    engine = EmbeddingEngine(backend, Batching(max_batch_tokens=4096, forward_overhead_tokens=64))
    bulk, single, too_big = short_mix(60, seed=5), ["Marie Curie"], ["alpha " * 300]
    results = engine.run(
        [EmbedRequest(bulk, OPTIONS), EmbedRequest(too_big, OPTIONS), EmbedRequest(single, OPTIONS)]
    )
    assert worst_cosine(results[0].vectors, minilm.encode(bulk)) >= 0.99999
    assert worst_cosine(results[2].vectors, minilm.encode(single)) >= 0.99999
    refused = results[1]
    assert isinstance(refused, ModelError)
    assert "input[0]" in str(refused) and "even alone" in str(refused) and "256 tokens" in str(refused)
    stats = engine.stats()
    assert stats["out_of_memory_passes"] >= 1 and backend.released >= 1
    assert 256 <= stats["max_batch_tokens_now"] < 4096  # the passes that follow are smaller
    assert stats["answered_calls"] == 2 and stats["failed_calls"] == 1
    # The squeeze ends: passes that fit earn the budget back, step by step, to max_batch_tokens.
    backend.limit = None
    budgets = []
    for _ in range(400):
        engine.run([EmbedRequest(["Pierre Curie"], OPTIONS)])
        budgets.append(engine.stats()["max_batch_tokens_now"])
        if budgets[-1] == 4096:
            break
    assert budgets[-1] == 4096 and budgets == sorted(budgets) and len(set(budgets)) > 2


class PoisoningBackend(SentenceTransformersBackend):
    """The real MiniLM whose "device" is poisoned by any pass holding the word 'volcano'."""

    def forward(self, items):
        volcano = self.model.tokenizer.convert_tokens_to_ids("volcano")
        if any(volcano in it.features["input_ids"].tolist() for it in items):
            raise torch.AcceleratorError(POISONED_CONTEXT)
        return super().forward(items)


def test_a_poisoned_context_fails_open_calls_refuses_new_ones_and_fails_the_health_check():
    backend = PoisoningBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=256)
    engine = EmbeddingEngine(backend, Batching(max_batch_tokens=4096, forward_overhead_tokens=64))
    assert engine.health() is None
    first = engine.run([EmbedRequest(["Warsaw"], OPTIONS)])
    assert first[0].vectors.shape == (1, 384)
    results = engine.run(
        [EmbedRequest(["Marie Curie"], OPTIONS), EmbedRequest(["a volcano erupts"], OPTIONS)]
    )
    assert all(isinstance(r, DeviceFault) for r in results), results
    assert "illegal memory access" in str(results[0])
    with pytest.raises(DeviceFault):
        engine.health()
    later = engine.run(
        [EmbedRequest(["Pierre Curie"], OPTIONS)]
    )  # refused at once: nothing runs here any more
    assert isinstance(later[0], DeviceFault)
    assert engine.stats()["device_fault"] == 1
    assert np.isfinite(first[0].vectors).all()


def test_a_gpu_share_that_cannot_hold_the_model_is_refused_with_its_numbers():
    from deployments.engine.gpu_share import gpu_share_problem

    assert gpu_share_problem("bge", need_gb=3.2, fraction=0.25, total_gb=24.0, free_gb=20.0) is None
    short = gpu_share_problem("nv-embed", need_gb=19.5, fraction=0.5, total_gb=24.0, free_gb=23.0)
    assert short is not None and "19.5 GB" in short and "0.5 of a 24.0 GB GPU (12.0 GB)" in short
    taken = gpu_share_problem("bge", need_gb=3.2, fraction=0.25, total_gb=24.0, free_gb=2.0)
    assert taken is not None and "only 2.0 GB" in taken and "other processes" in taken


def test_the_warm_up_runs_the_largest_pass_the_budget_allows_and_an_oom_there_stops_the_start(minilm):
    from deployments.engine.gpu_share import warm_up, warmup_shape

    batching = Batching(max_batch_tokens=4096, max_batch_size=256)
    assert warmup_shape(batching, 256) == (16, 256)
    assert warmup_shape(Batching(max_batch_tokens=4096, max_batch_size=8), 256) == (8, 256)
    assert warmup_shape(Batching(max_batch_tokens=128, max_batch_size=8), 512) == (1, 128)
    backend = MemoryLimitedBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=256)
    assert warm_up(backend, batching, "all-MiniLM-L6-v2") == (16, 256)  # 16 x 256 = the whole budget
    backend.limit = 2048  # a "device" that holds half the budget
    with pytest.raises(RuntimeError, match=r"16 inputs of 256 tokens, max_batch_tokens 4096\) does not fit"):
        warm_up(backend, batching, "all-MiniLM-L6-v2")
