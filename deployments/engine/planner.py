"""The batch planner: token lengths in, micro-batches out.

A forward pass costs roughly ``rows x longest row`` padded tokens plus a fixed overhead. Sorting by length
and cutting the sorted run optimally (a small dynamic programme) keeps padding low without paying for
many tiny passes, while each micro-batch stays within the token budget (``rows x longest <= max_tokens``)
and the row cap. Inputs longer than the budget cannot exist: config validation keeps
``max_batch_tokens >= max_seq_length`` and tokenisation truncates at ``max_seq_length``.

A packing backend (inputs concatenated, no padding) pays its real tokens instead: the same programme then
cuts the sorted run into the fewest passes whose token sums fit the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batches as arrays of original indices, plus what they cost."""

    batches: list[np.ndarray]
    real_tokens: int
    padded_tokens: int

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def batch_cost(lengths: np.ndarray, packed: bool) -> int:
    """Tokens a forward pass over these inputs computes: the sum when packed, else rows x longest."""
    if len(lengths) == 0:
        return 0
    return int(lengths.sum()) if packed else len(lengths) * int(lengths.max())


def plan_micro_batches(
    lengths: list[int] | np.ndarray,
    max_batch_tokens: int,
    max_batch_size: int,
    forward_overhead_tokens: int = 0,
    packed: bool = False,
) -> BatchPlan:
    """Partition inputs into micro-batches minimising padded tokens + overhead per pass.

    Each micro-batch holds a contiguous run of the length-sorted inputs (an optimal partition always
    has that shape); batches come out shortest first. ``packed``: a batch costs the sum of its lengths
    and that sum, not ``rows x longest``, must fit ``max_batch_tokens``.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return BatchPlan([], 0, 0)
    if lens.min() < 1:
        raise ValueError("every input has at least one token")
    if lens.max() > max_batch_tokens:
        raise ValueError(f"an input of {lens.max()} tokens exceeds max_batch_tokens {max_batch_tokens}")
    order = np.argsort(lens, kind="stable")
    sorted_lens = lens[order]
    prefix = np.concatenate([[0], np.cumsum(sorted_lens)])

    # cost[j] = cheapest plan for the first j sorted inputs; start[j] = where its last batch begins.
    cost = np.zeros(n + 1, dtype=np.float64)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        if packed:
            first = int(np.searchsorted(prefix, prefix[j] - max_batch_tokens, side="left"))
            i = np.arange(max(first, j - max_batch_size), j)
            paid = prefix[j] - prefix[i]
        else:
            longest = int(sorted_lens[j - 1])
            i = np.arange(j - min(max_batch_size, max_batch_tokens // longest, j), j)
            paid = (j - i) * longest
        candidates = cost[i] + paid + forward_overhead_tokens
        best = int(np.argmin(candidates))
        cost[j] = candidates[best]
        start[j] = i[best]

    batches: list[np.ndarray] = []
    padded = 0
    j = n
    while j > 0:
        i = int(start[j])
        batches.append(order[i:j])
        padded += batch_cost(sorted_lens[i:j], packed)
        j = i
    batches.reverse()
    return BatchPlan(batches, int(lens.sum()), padded)
