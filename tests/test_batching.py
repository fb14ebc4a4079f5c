"""The batch planner: budgets hold, every input is planned once, and the cut is optimal."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from deployments.engine.planner import plan_micro_batches


def brute_force_cost(lengths, budget, rows_cap, overhead, packed=False):
    """Cheapest cut of the sorted lengths into contiguous runs, by trying every cut."""
    s = sorted(lengths)
    n = len(s)
    best = float("inf")
    for mask in itertools.product([0, 1], repeat=n - 1):
        cuts = [0] + [i + 1 for i, m in enumerate(mask) if m] + [n]
        cost = 0
        for a, b in itertools.pairwise(cuts):
            rows = b - a
            paid = sum(s[a:b]) if packed else rows * s[b - 1]
            if rows > rows_cap or paid > budget:
                cost = float("inf")
                break
            cost += paid + overhead
        best = min(best, cost)
    return best


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("seed", range(20))
def test_plan_is_valid_and_optimal(seed, packed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 10))]
    budget, rows_cap, overhead = rng.randint(40, 120), rng.randint(1, 6), rng.choice([0, 8, 30])
    plan = plan_micro_batches(lengths, budget, rows_cap, overhead, packed=packed)
    seen = np.concatenate(plan.batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for rows in plan.batches:
        assert len(rows) <= rows_cap
        paid = sum(lengths[i] for i in rows) if packed else len(rows) * max(lengths[i] for i in rows)
        assert paid <= budget
    cost = plan.padded_tokens + overhead * len(plan.batches)
    assert cost == brute_force_cost(lengths, budget, rows_cap, overhead, packed)
    assert plan.real_tokens == sum(lengths)
    if packed:
        assert plan.padded_tokens == plan.real_tokens


def test_a_request_larger_than_the_budget_is_split():
    plan = plan_micro_batches([100] * 50, max_batch_tokens=1000, max_batch_size=256)
    assert len(plan.batches) == 5 and all(len(b) == 10 for b in plan.batches)


def test_mixed_lengths_pad_little():
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(512) < 0.6, rng.integers(4, 8, 512), rng.integers(12, 160, 512))
    plan = plan_micro_batches(lengths, 16384, 256, forward_overhead_tokens=64)
    assert plan.padding_efficiency > 0.9


def test_packed_plans_fill_the_budget_with_any_mix_of_lengths():
    rng = np.random.default_rng(1)
    lengths = np.maximum(1, rng.lognormal(np.log(15), 0.8, 4096).astype(int))
    plan = plan_micro_batches(lengths, 16384, 4096, forward_overhead_tokens=64, packed=True)
    assert plan.padding_efficiency == 1.0
    assert len(plan.batches) <= -(-int(lengths.sum()) // 16384) + 1  # each pass all but full
    padded = plan_micro_batches(lengths, 16384, 4096, forward_overhead_tokens=64)
    assert padded.padding_efficiency < 0.99


def test_edge_cases():
    assert plan_micro_batches([], 10, 10).batches == []
    with pytest.raises(ValueError, match="exceeds max_batch_tokens"):
        plan_micro_batches([11], 10, 10)
