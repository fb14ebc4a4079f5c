"""The per-pass fixed cost: fitted from timed passes, measured by each engine at load unless configured."""

from __future__ import annotations

import time

import pytest

from deployments.config import Batching
from deployments.engine.backends.registry import load_sentence_transformers
from deployments.engine.embedding_engine import EmbeddingEngine
from deployments.engine.pass_cost import fit_pass_cost, measure_pass_cost, timing_shapes
from tests.conftest import MINILM_DIR


def test_the_fit_recovers_a_known_cost_and_its_overhead_in_tokens():
    samples = [(t, 0.004 + 2e-5 * t) for t in (8, 64, 256, 1024)]
    cost = fit_pass_cost(samples)
    assert cost.fixed_s == pytest.approx(0.004) and cost.per_token_s == pytest.approx(2e-5)
    assert cost.overhead_tokens == 200  # 4 ms of fixed cost = 200 tokens at 20 us each


def test_noise_never_gives_a_negative_or_infinite_overhead():
    below_zero = [(t, max(1e-6, 2e-5 * t - 5e-4)) for t in (8, 64, 256, 1024)]  # intercept -0.5 ms
    assert fit_pass_cost(below_zero).overhead_tokens == 0
    flat = fit_pass_cost([(8, 0.010), (64, 0.010), (256, 0.009)])  # no slope: time does not grow
    assert flat.per_token_s > 0 and 0 < flat.overhead_tokens < 10_000


def test_shapes_stay_within_the_budget_and_the_model_limit():
    assert timing_shapes(4096, 256) == [(1, 8), (4, 16), (8, 32), (16, 64)]
    assert timing_shapes(128, 512) == [(1, 8), (4, 16), (4, 32), (2, 64)]  # 128 tokens at most
    assert timing_shapes(4096, 12) == [(1, 8), (4, 12), (8, 12), (16, 12)]  # max_seq_length 12


def test_measuring_times_real_passes_and_stops_early_on_slow_ones():
    """A pass that really costs 20 ms + 0.1 ms a token; a slow one (> 2 s) is timed once."""
    seen = []

    def run_pass(rows: int, length: int) -> None:
        seen.append((rows, length))
        time.sleep(0.02 + 1e-4 * rows * length)

    cost = measure_pass_cost(run_pass, 4096, 256)
    assert cost.overhead_tokens == pytest.approx(200, rel=0.25)
    # An untimed first pass per shape, then at least 3 timed and 0.15 s of them: 20.8 ms passes 7-8 times.
    assert 1 + 7 <= seen.count((1, 8)) <= 1 + 8 and seen.count((16, 64)) == 1 + 3
    slow: list[tuple[int, int]] = []
    measure_pass_cost(lambda r, n: (slow.append((r, n)), time.sleep(0.06)), 4096, 256, slow_s=0.05)
    assert slow == [(1, 8), (4, 16), (8, 32)]  # a slow first pass counts; each once; no fourth shape


def test_an_engine_measures_its_model_unless_the_config_says():
    """On real MiniLM: the engine times its own passes at construction; a configured value wins."""
    backend = load_sentence_transformers(MINILM_DIR, max_seq_length=256)
    measured = EmbeddingEngine(backend, Batching(max_batch_tokens=4096))
    configured = EmbeddingEngine(backend, Batching(max_batch_tokens=4096, forward_overhead_tokens=64))
    try:
        assert 0 <= measured.batching.forward_overhead_tokens < 4096
        assert measured.overhead_source.startswith("measured at load: ")
        assert (
            measured.scheduler.batching.forward_overhead_tokens == measured.batching.forward_overhead_tokens
        )
        assert configured.batching.forward_overhead_tokens == 64 and configured.overhead_source == "config"
    finally:
        measured.close()
        configured.close()
