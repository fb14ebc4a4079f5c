"""What one more forward pass costs, measured on the replica's own model and hardware at load.

The planner (``batching.plan_micro_batches``) trades padding against passes with one number: a pass's
fixed cost in padded tokens (``forward_overhead_tokens``). It differs by orders of magnitude between
models and machines: MiniLM on a CPU pays about a millisecond per pass, while full-size NV-Embed-v2 on a
CPU streams its 15.7 GB of weights through memory on every pass, which costs as much as hundreds of
tokens of work. So a replica times passes of known shapes after it loads (``measure_pass_cost``) and
fits ``seconds = fixed + per_token x padded tokens``; the overhead is ``fixed / per_token``. A config's
``batching.forward_overhead_tokens`` overrides the measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Timed shapes as (rows, tokens each), capped by the budget and max_seq_length: a single short row pins the
# fixed cost, the others are the padded multi-row passes of short texts the planner weighs against it.
SHAPES = ((1, 8), (4, 16), (8, 32), (16, 64))
REPEATS = 3
# A shape whose passes took this long is timed no more (and no larger one once three are in): a 7.85B
# model on a CPU has its slope after three shapes, and its start should not wait a minute for more.
SLOW_S = 2.0
MIN_TIMED_S = 0.15
MAX_TIMED = 40


@dataclass(frozen=True)
class PassCost:
    """A fitted pass cost: ``fixed_s + per_token_s x padded tokens``, and the samples it came from."""

    fixed_s: float
    per_token_s: float
    samples: tuple[tuple[int, float], ...]  # (padded tokens, best seconds)

    @property
    def overhead_tokens(self) -> int:
        """The fixed cost in tokens of work, as the planner counts it (0 when no fixed cost shows)."""
        if self.per_token_s <= 0:
            return 0
        return max(0, round(self.fixed_s / self.per_token_s))

    def describe(self) -> str:
        return (
            f"measured at load: {self.fixed_s * 1e3:.2f} ms a pass + {self.per_token_s * 1e6:.2f} us a token "
            f"over {len(self.samples)} shapes"
        )


def fit_pass_cost(samples: list[tuple[int, float]]) -> PassCost:
    """Least squares of seconds on padded tokens, weighted by 1/seconds: timing noise grows with a pass's
    length, and unweighted the longest pass's noise sets the intercept (measured on MiniLM: 9-228 tokens
    over four runs, against 28-39 weighted). A negative intercept (noise on a tiny fixed cost) counts as
    none; a non-positive slope (timings that do not grow with tokens) leaves the slope at the mean cost per
    token so the overhead stays finite."""
    tokens = np.array([t for t, _ in samples], dtype=np.float64)
    seconds = np.array([s for _, s in samples], dtype=np.float64)
    slope, intercept = np.polyfit(tokens, seconds, 1, w=1.0 / seconds)
    if slope <= 0:
        slope = float((seconds / tokens).mean())
    return PassCost(max(0.0, float(intercept)), float(slope), tuple(samples))


def timing_shapes(max_batch_tokens: int, max_seq_length: int) -> list[tuple[int, int]]:
    """(rows, tokens each) per timed pass, within ``max_seq_length`` and the token budget."""
    shapes = []
    for rows, length in SHAPES:
        length = min(length, max_seq_length, max_batch_tokens)
        rows = max(1, min(rows, max_batch_tokens // length))
        if (rows, length) not in shapes:
            shapes.append((rows, length))
    return shapes


def measure_backend_pass_cost(backend, batching) -> PassCost:
    """``measure_pass_cost`` on a backend's own passes (``forward`` only: the engine tokenises on another
    thread): rows of one ordinary text truncated to each length."""
    text = "measuring what one forward pass costs on this replica " * 64
    items = {}

    def run_pass(rows: int, length: int) -> None:
        if length not in items:
            items[length] = backend.tokenize([text], "", max_length=length)[0]
        backend.forward([items[length]] * rows)

    return measure_pass_cost(run_pass, batching.max_batch_tokens, backend.max_seq_length)


def measure_pass_cost(
    run_pass: Callable[[int, int], None],
    max_batch_tokens: int,
    max_seq_length: int,
    repeats: int = REPEATS,
    slow_s: float = SLOW_S,
) -> PassCost:
    """Times ``run_pass(rows, length)`` on each shape (after one untimed pass of it, which counts when it was
    slow already), best of ``repeats`` (fewer for slow passes: ``slow_s``), and fits the cost. Best, not
    mean: a CPU shared with Ray's own processes only ever adds time."""
    shapes = timing_shapes(max_batch_tokens, max_seq_length)
    samples: list[tuple[int, float]] = []
    for rows, length in shapes:
        if len(samples) >= 3 and samples[-1][1] > slow_s:
            break
        start = time.perf_counter()
        run_pass(rows, length)  # a new shape's first pass compiles or selects kernels: not the pass's cost
        first = time.perf_counter() - start
        times: list[float] = [] if first < slow_s else [first]
        # At least ``repeats`` passes and MIN_TIMED_S of them (a millisecond pass is noisy: best of dozens),
        # at most MAX_TIMED passes, and none more once they add up to ``slow_s``.
        while (
            (len(times) < repeats or sum(times) < MIN_TIMED_S)
            and len(times) < MAX_TIMED
            and sum(times) < slow_s
        ):
            start = time.perf_counter()
            run_pass(rows, length)
            times.append(time.perf_counter() - start)
        samples.append((rows * length, min(times)))
    return fit_pass_cost(samples)
