"""The replica's scheduler without Ray: fairness, per-call delivery, cancellation, ageing, failure isolation
and the token budget. The backend here is a stand-in with a controllable cost (the thing under test is the
scheduler); the engine around it, on the real MiniLM, is tests/test_engine.py."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from deployments.config import Batching
from deployments.engine.backends.base import EmbeddingBackend, EncodedText
from deployments.engine.planner import batch_cost, plan_micro_batches
from deployments.engine.scheduler import Scheduler, pass_budget
from deployments.protocol.options import EmbedResult


class CountingBackend(EmbeddingBackend):
    """Vectors that encode each input ([first token id, length, 1]), every pass recorded, an optional hook
    run inside each forward pass, token ids >= ``poison`` fail any pass they are in."""

    dimension = 3
    max_seq_length = 512
    device = torch.device("cpu")

    def __init__(self, packed: bool = False, poison: int | None = None, nan_id: int | None = None):
        self.packed = packed
        self.poison = poison
        self.nan_id = nan_id
        self.passes: list[list[int]] = []  # lengths of every pass, in order
        self.pass_ids: list[list[int]] = []  # first token id of each row, per pass
        self.hook = None

    def tokenize(self, texts, prompt, max_length=None):
        raise NotImplementedError  # items are built by the tests

    def forward(self, items):
        self.passes.append([it.length for it in items])
        ids = [int(it.features["input_ids"][0]) for it in items]
        self.pass_ids.append(ids)
        if self.hook is not None:
            self.hook()
        if self.poison is not None and any(i >= self.poison for i in ids):
            raise RuntimeError("poisoned row")
        out = np.array([[i, it.length, 1.0] for i, it in zip(ids, items, strict=True)], dtype=np.float32)
        if self.nan_id is not None:
            out[[i == self.nan_id for i in ids]] = np.nan
        return out


def items_of(lengths: list[int], first_id: int = 0) -> list[EncodedText]:
    return [
        EncodedText({"input_ids": torch.full((n,), first_id + i, dtype=torch.long)}, n)
        for i, n in enumerate(lengths)
    ]


class Caller:
    """Admits a call and keeps what it is answered, and when (in forward passes)."""

    def __init__(self, scheduler: Scheduler, lengths: list[int], first_id: int = 0, normalize: bool = False):
        self.scheduler = scheduler
        self.result: EmbedResult | Exception | None = None
        self.answered_after: int | None = None
        self.ticket = scheduler.admit(items_of(lengths, first_id), normalize, self._done)

    def _done(self, result):
        self.result = result
        self.answered_after = len(self.scheduler.backend.passes)


def drain(scheduler: Scheduler, limit: int = 10_000) -> int:
    steps = 0
    while scheduler.step():
        steps += 1
        assert steps < limit
    return steps


BUDGET = Batching(max_batch_tokens=100, max_batch_size=10, forward_overhead_tokens=8)


def test_a_small_call_leads_the_next_pass_and_is_answered_at_once():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    bulk = Caller(s, [10] * 100, first_id=1000)  # ten full passes of 10 x 10 tokens
    assert s.step()
    small = Caller(s, [3], first_id=1)
    assert s.step()
    assert backend.pass_ids[1] == [1]  # the very next pass carries it, alone: a short one
    assert small.answered_after == 2 and isinstance(small.result, EmbedResult)
    assert bulk.result is None  # the bulk call is still running, answered later, whole
    drain(s)
    assert bulk.answered_after == len(backend.passes) == 11
    np.testing.assert_array_equal(bulk.result.vectors[:, 0], np.arange(1000, 1100))
    assert bulk.result.token_counts.tolist() == [10] * 100


def test_a_single_text_rides_along_when_the_pass_stays_short():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    bulk = Caller(s, [10] * 2, first_id=1000)  # one batch of 20 tokens: room for one more row
    small = Caller(s, [4], first_id=1)
    drain(s)
    # 3 x 10 = 30 padded + 8 for the pass: within RIDE_ALONG_LIMIT (4) x its own pass (4 + 8)
    assert backend.passes == [[4, 10, 10]]
    assert small.answered_after == bulk.answered_after == 1


def test_a_small_call_beside_bulk_work_gets_a_short_pass_of_its_own():
    """Riding along in a full pass (100 + 8) would cost a 3-token call 9 times its own pass (3 + 8): it runs
    apart, first, and the bulk call's rows are planned among themselves."""
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    bulk = Caller(s, [10] * 5, first_id=1000)  # 50 + 8 with it would be 60 + 8 > 4 x (4 + 8)
    small = Caller(s, [4], first_id=1)
    drain(s)
    assert backend.passes == [[4], [10] * 5]
    assert small.answered_after == 1 and bulk.answered_after == 2
    several = [Caller(s, [n], first_id=10 + n) for n in (2, 3, 5)]  # small calls together, beside bulk
    bulk = Caller(s, [10] * 30, first_id=2000)
    drain(s)
    assert backend.passes[2] == [2, 3, 5] and all(c.answered_after == 3 for c in several)
    assert [len(p) for p in backend.passes[3:]] == [10, 10, 10] and bulk.answered_after == 6
    jointly = CountingBackend()  # the other policy: it rides along in the bulk call's pass
    s = Scheduler(jointly, BUDGET.model_copy(update={"small_calls_apart": False}))
    bulk, small = Caller(s, [10] * 5, first_id=1000), Caller(s, [4], first_id=1)
    drain(s)
    assert jointly.passes == [[4, 10, 10, 10, 10, 10]] and small.answered_after == 1


def test_each_call_is_answered_when_its_own_rows_are_done():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    callers = [Caller(s, [10] * n, first_id=100 * (k + 1)) for k, n in enumerate([30, 10, 20])]
    drain(s)
    order = sorted(callers, key=lambda c: c.answered_after)
    assert [len(c.result.vectors) for c in order] == [10, 20, 30]  # shortest first
    assert [c.answered_after for c in order] == [1, 3, 6]  # none waited for the passes of another's rows


def test_cancelled_rows_leave_the_queue_and_no_pass_includes_them():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    leaver = Caller(s, [10] * 50, first_id=1000)
    stayer = Caller(s, [10] * 60, first_id=2000)
    assert s.step()  # the smaller (leaver) leads
    assert all(1000 <= i < 1100 for i in backend.pass_ids[0])
    assert s.cancel(leaver.ticket) == 40
    assert s.cancel(leaver.ticket) == 0  # idempotent
    drain(s)
    computed = [i for ids in backend.pass_ids for i in ids]
    assert sum(1000 <= i < 1100 for i in computed) == 10  # only the pass that ran before it left
    assert leaver.result is None and isinstance(stayer.result, EmbedResult)
    stats = s.stats()
    assert stats["dropped_inputs"] == 40 and stats["cancelled_calls"] == 1 and stats["queue_inputs"] == 0


def test_rows_finished_after_their_caller_left_are_counted_not_delivered():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    leaver = Caller(s, [10] * 30, first_id=1000)
    backend.hook = lambda: s.cancel(leaver.ticket)  # the caller hangs up during the first pass
    drain(s)
    assert len(backend.passes) == 1 and leaver.result is None
    stats = s.stats()
    assert stats["abandoned_inputs"] == 10 and stats["dropped_inputs"] == 20


def test_ageing_bounds_how_long_a_bulk_call_waits_behind_a_stream_of_small_ones():
    backend = CountingBackend()
    s = Scheduler(backend, Batching(max_batch_tokens=100, max_batch_size=1, forward_overhead_tokens=0))
    bulk = Caller(s, [100] * 5, first_id=1000)  # five one-row passes of 100 tokens; nothing can share one
    for k in range(1000):
        Caller(s, [10], first_id=k + 1)  # a new small call before every pass, forever
        s.step()
        if bulk.result is not None:
            break
    assert isinstance(bulk.result, EmbedResult)
    runs = ["bulk" if ids[0] >= 1000 else "small" for ids in backend.pass_ids]
    # Shortest first: small calls lead until others ran half of the bulk call's 500 tokens (25 x 10 x 2)...
    assert runs.index("bulk") == 25
    # ...then nobody overtakes it for long, and a waiting small call still gets in between its passes.
    assert len(runs) <= 25 + 5 + 5
    assert "small" in runs[runs.index("bulk") : len(runs) - 1]


def test_a_query_overtakes_bulk_calls_that_waited_only_behind_older_ones():
    """A client cuts a big encode into several requests in flight at once; while the first runs, the others
    wait behind an older call, which is arrival order, not being overtaken: they must not age, or their keys
    fall below any newcomer's and a query that comes later waits for all of them (seen: up to 25 s on CPU)."""
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    bulk = [Caller(s, [10] * 40, first_id=1000 * (k + 1)) for k in range(4)]  # 4 passes of 100 tokens each
    for _ in range(6):  # the first request done, the second under way
        s.step()
    query = Caller(s, [4], first_id=1)
    s.step()
    assert query.answered_after == 7, [ids[0] for ids in backend.pass_ids]  # the very next pass
    drain(s)
    finished = [c.answered_after for c in bulk]
    assert finished == sorted(finished)  # equal requests in arrival order


def test_without_newcomers_shortest_remaining_goes_first():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    big, mid, tiny = Caller(s, [10] * 40, 1000), Caller(s, [10] * 20, 2000), Caller(s, [10] * 10, 3000)
    drain(s)
    assert tiny.answered_after < mid.answered_after < big.answered_after


def test_a_failing_row_fails_only_its_call_and_names_the_input():
    backend = CountingBackend(poison=5000)
    s = Scheduler(backend, Batching(max_batch_tokens=1000, max_batch_size=64, forward_overhead_tokens=64))
    good = Caller(s, [4, 6], first_id=10)
    bad = Caller(s, [5, 5, 5], first_id=4998)  # its third input (id 5000) poisons any pass it is in
    other = Caller(s, [7], first_id=20)
    drain(s)
    assert isinstance(bad.result, RuntimeError) and "input[2]" in str(bad.result)
    assert "poisoned row" in str(bad.result)
    np.testing.assert_array_equal(good.result.vectors[:, 0], [10, 11])
    np.testing.assert_array_equal(other.result.vectors[:, 0], [20])
    assert s.stats()["failed_calls"] == 1


def test_a_wrong_shaped_output_fails_only_the_rows_that_produce_it():
    class HalfBroken(CountingBackend):
        def forward(self, items):
            out = super().forward(items)
            return out[:, :2] if any(int(it.features["input_ids"][0]) == 66 for it in items) else out

    backend = HalfBroken()
    s = Scheduler(backend, BUDGET)
    bad, good = Caller(s, [3], first_id=66), Caller(s, [3, 4], first_id=70)
    drain(s)
    assert isinstance(bad.result, RuntimeError) and "shape (1, 2), expected (1, 3)" in str(bad.result)
    np.testing.assert_array_equal(good.result.vectors[:, 0], [70, 71])


def test_a_failing_answer_leaves_no_other_caller_waiting_and_the_thread_serving():
    import threading

    s = Scheduler(CountingBackend(), BUDGET)
    answers: list = []

    def explode(result):
        answers.append(result)
        raise RuntimeError("the caller's loop is gone")

    s.admit(items_of([3]), False, explode)  # both share the first pass; the first answer raises
    s.admit(items_of([4], first_id=5), False, answers.append)
    thread = threading.Thread(target=s.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while len(answers) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.admit(items_of([4], first_id=9), False, answers.append)
    while len(answers) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop()
    thread.join(5)
    assert [a.vectors[0, 0] for a in answers] == [0, 5, 9]  # the second caller was answered; still serving


def test_non_finite_output_is_refused_for_its_call_only():
    backend = CountingBackend(nan_id=7)
    s = Scheduler(backend, BUDGET)
    bad, good = Caller(s, [3], first_id=7), Caller(s, [3], first_id=8)
    drain(s)
    assert isinstance(bad.result, RuntimeError) and "non-finite" in str(bad.result)
    assert isinstance(good.result, EmbedResult)


def test_normalize_applies_per_call():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    plain, unit = Caller(s, [3], first_id=4), Caller(s, [3], first_id=4, normalize=True)
    drain(s)
    assert plain.result.vectors[0, 0] == 4
    assert abs(np.linalg.norm(unit.result.vectors[0]) - 1) < 1e-6


@pytest.mark.parametrize("window_rows", [None, 7])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_the_budget_is_never_exceeded_and_every_row_reaches_its_caller(packed, seed, window_rows):
    rng = random.Random(seed)
    batching = Batching(
        max_batch_tokens=rng.choice([64, 128, 300]),
        max_batch_size=rng.choice([1, 3, 8, 32]),
        forward_overhead_tokens=rng.choice([0, 16, 64]),
    )
    backend = CountingBackend(packed=packed)
    s = Scheduler(backend, batching, window_rows=window_rows)
    callers = []
    for k in range(40):
        n = rng.choice([1, 1, 2, 5, 20, 80])
        lengths = [rng.randint(1, 64) for _ in range(n)]
        callers.append((Caller(s, lengths, first_id=1000 * (k + 1)), lengths))
        for _ in range(rng.randint(0, 2)):
            s.step()
        if rng.random() < 0.1:
            s.cancel(callers[rng.randrange(len(callers))][0].ticket)
    drain(s)
    for lengths in backend.passes:
        assert len(lengths) <= batching.max_batch_size
        assert batch_cost(np.array(lengths), packed) <= batching.max_batch_tokens
    stats = s.stats()
    delivered = 0
    for k, (caller, lengths) in enumerate(callers):
        if caller.result is None:
            continue  # cancelled
        delivered += 1
        np.testing.assert_array_equal(caller.result.vectors[:, 0], 1000 * (k + 1) + np.arange(len(lengths)))
        np.testing.assert_array_equal(caller.result.vectors[:, 1], lengths)
    assert delivered == stats["answered_calls"] == 40 - stats["cancelled_calls"]
    assert stats["queue_inputs"] == 0 and stats["queue_calls"] == 0


def test_the_queue_is_planned_as_one_request_would_be():
    rng = np.random.default_rng(0)
    backend = CountingBackend()
    b = Batching(max_batch_tokens=256, max_batch_size=16, forward_overhead_tokens=16)
    s = Scheduler(backend, b)
    calls = [list(rng.integers(1, 60, size=n)) for n in (40, 7, 90, 6, 25)]
    assert min(sum(c) for c in calls) > 256 / 8  # no small call here: those may be planned apart
    for k, lengths in enumerate(calls):
        Caller(s, lengths, first_id=1000 * (k + 1))
    drain(s)
    joint = plan_micro_batches(np.concatenate(calls), 256, 16, 16)
    stats = s.stats()
    assert stats["padded_tokens"] == joint.padded_tokens and stats["forward_passes"] == len(joint.batches)


def test_a_window_smaller_than_the_queue_still_keeps_the_budget():
    backend = CountingBackend()
    b = Batching(max_batch_tokens=64, max_batch_size=4, forward_overhead_tokens=64)
    s = Scheduler(backend, b, window_rows=6)
    big, small = Caller(s, list(range(1, 31)), first_id=1000), Caller(s, [5, 6], first_id=1)
    drain(s)
    assert small.answered_after == 1
    assert isinstance(big.result, EmbedResult) and len(big.result.vectors) == 30
    assert all(len(p) <= 4 and len(p) * max(p) <= 64 for p in backend.passes)


def test_stats_report_the_queue_and_the_waits():
    backend = CountingBackend()
    s = Scheduler(backend, BUDGET)
    Caller(s, [10] * 25, first_id=100)
    stats = s.stats()
    assert (stats["queue_calls"], stats["queue_inputs"], stats["queue_tokens"]) == (1, 25, 250)
    drain(s)
    stats = s.stats()
    assert stats["forward_passes"] == 3 and stats["rows"] == 25 and stats["real_tokens"] == 250
    assert stats["max_pass_rows"] == 10 and stats["max_pass_tokens"] == 100
    assert 0 <= stats["queue_wait_seconds_p50"] <= stats["queue_wait_seconds_max"] < 5
    assert stats["padding_efficiency"] == 1.0 and stats["rows_per_pass"] == 25 / 3


class RecordingObserver:
    def __init__(self):
        self.inputs, self.passes, self.drops, self.waits, self.queue_seen = 0, [], 0, 0, []

    def queue(self, inputs, tokens):
        self.queue_seen.append((inputs, tokens))

    def admitted(self, inputs):
        self.inputs += inputs

    def waited(self, seconds):
        self.waits += 1

    def ran_pass(self, rows, real_tokens, padded_tokens, seconds):
        self.passes.append((rows, real_tokens, padded_tokens))

    def dropped(self, inputs):
        self.drops += inputs


def test_the_observer_is_told_every_decision():
    observer = RecordingObserver()
    s = Scheduler(CountingBackend(), BUDGET, observer=observer)
    Caller(s, [10] * 25, first_id=100)
    leaver = Caller(s, [10] * 30, first_id=1000)
    assert observer.queue_seen[-1] == (55, 550)
    assert s.step()
    s.cancel(leaver.ticket)
    drain(s)
    assert observer.inputs == 55 and observer.waits == 1  # the leaver never reached a pass
    assert sum(p[0] for p in observer.passes) == s.stats()["rows"] == 25 + 30 - observer.drops
    assert sum(p[1] for p in observer.passes) == s.stats()["real_tokens"]
    assert observer.drops == s.stats()["dropped_inputs"] > 0
    assert observer.queue_seen[-1] == (0, 0)  # the gauges come back to an empty queue


class ShortInputsBackend(CountingBackend):
    """Inputs of at most 16 tokens, and each pass advances a clock by 1 ms per token of work (padded
    tokens plus the pass's fixed cost), as a model's pass would take."""

    max_seq_length = 16

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.hook = self._advance

    def clock(self) -> float:
        return self.now

    def _advance(self):
        lengths = self.passes[-1]
        self.now += 0.001 * (len(lengths) * max(lengths) + BUDGET.forward_overhead_tokens)


def test_the_pass_budget_is_cut_to_the_configured_time_only_while_queries_come_in():
    nv = Batching(max_batch_tokens=32768, forward_overhead_tokens=256, interactive_pass_ms=250)
    per_token = 1 / 30_000  # NV-Embed-v2's anchor on an H200: 30k tokens/s
    assert pass_budget(nv, 32768, per_token, 4096, since_small_s=0.1) == (7500 - 256, True)
    assert pass_budget(nv, 32768, per_token, 4096, since_small_s=6.0) == (32768, False)  # past the hold
    assert pass_budget(nv, 32768, None, 4096, since_small_s=0.1) == (32768, False)  # no estimate yet
    assert pass_budget(nv, 32768, per_token / 8, 4096, since_small_s=0.1) == (32768, False)  # fits anyway
    assert pass_budget(nv, 32768, per_token * 4, 4096, since_small_s=0.1) == (4096, True)  # one long input
    assert pass_budget(nv, 8192, per_token, 4096, since_small_s=0.1) == (7500 - 256, True)  # after an OOM
    off = nv.model_copy(update={"interactive_pass_ms": None})
    assert pass_budget(off, 32768, per_token, 4096, since_small_s=0.0) == (32768, False)


def test_bulk_passes_are_cut_while_queries_come_in_and_grow_back_after():
    """Full passes take 108 ms here (100 tokens + 8). With interactive_pass_ms 50, a query that comes in
    runs in a pass of its own, and the bulk call's passes after it hold 4 rows (40 tokens + 8: 48 ms) for
    the hold (20 x 50 ms), then 10 again."""
    backend = ShortInputsBackend()
    batching = BUDGET.model_copy(update={"interactive_pass_ms": 50})
    s = Scheduler(backend, batching, clock=backend.clock)
    bulk = Caller(s, [10] * 200, first_id=1000)
    s.step(), s.step()  # two full passes: the estimate (1 ms per token of work)
    query = Caller(s, [4], first_id=1)
    s.step()
    assert query.answered_after == 3 and backend.passes[2] == [4]  # its own pass, next
    drain(s)
    rows = [len(p) for p in backend.passes]
    cut = next(i for i, r in enumerate(rows[3:]) if r != 4)  # passes of 4 rows after the query's
    assert rows[:3] == [10, 10, 1] and 18 <= cut <= 22, rows  # ~1 s of 48 ms passes of 4 rows
    assert all(4 < r <= 10 for r in rows[3 + cut :]) and sum(rows) == 201, rows  # then full passes again
    assert s.stats()["cut_passes"] == cut + 1 and isinstance(bulk.result, EmbedResult)  # + the query's
    again = Scheduler(ShortInputsBackend(), BUDGET)  # unset: the same traffic keeps full passes
    Caller(again, [10] * 200, first_id=1000)
    again.step(), again.step()
    Caller(again, [4], first_id=1)
    drain(again)
    assert [len(p) for p in again.backend.passes] == [10, 10, 1] + [10] * 18
    assert again.stats()["cut_passes"] == 0
