"""The replica's scheduler: one queue of tokenised inputs, one decision per forward pass.

Calls arrive already tokenised and planned (``plan_call``: the length-sorted optimal cut of the call's own
inputs into micro-batches under the token budget, computed by the caller's thread, off the model thread).
The scheduler owns every queued micro-batch and, before each forward pass, decides which of them run
together. Each call is answered the moment its last row is done; a cancelled call's queued rows leave the
queue and no later pass includes them.

Policy: **shortest remaining work first, aged by the work done for others.** A call's key is

    key = padded tokens of its queued micro-batches - tokens run for other calls while it waited

and the call with the lowest key (then the oldest) leads the next pass. Why this one:

- A small call that arrives during a bulk call has a tiny key, so it leads the very next pass: it waits
  for at most the pass in progress plus its own. Shortest-first also minimises the mean response time.
- Ageing bounds starvation without a clock: every pass a waiting call does not take part in lowers its key
  by that pass's tokens, so once others have run as many tokens as the call has left, its key is <= 0 and
  no call that arrives later can overtake it (a newcomer's key is its own size, > 0). A bulk call under a
  stream of small ones is delayed by at most its own remaining work.
- The pass then takes more micro-batches, in key order, while the union fits the budget (rows <=
  ``max_batch_size``; ``rows x longest`` <= ``max_batch_tokens``, or the token sum when packed) and merging
  pays under the planner's own cost model (padded tokens of the union <= those of the parts + the
  per-pass overhead). A single text rides along with a bulk call's short micro-batch for free, so the bulk
  call keeps its throughput, and concurrent small calls share one pass.

Deficit round-robin was the other candidate: it shares passes equally between calls, which makes a
one-text call wait for a turn behind every active call, and it needs a quantum tuned per model.

Failure isolation: a pass that raises is run again row by row; a failing row fails only its own call
(naming the input), whose remaining rows then leave the queue. Non-finite output fails its call.

Thread model: ``admit`` and ``cancel`` come from the event loop, passes run on one model thread
(``run_forever`` or ``step``); queue state is guarded by one lock and the forward pass runs outside it.
Callbacks are invoked on the model thread, outside the lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from deployments.backends.base import EmbeddingBackend, EncodedText
from deployments.batching import plan_micro_batches
from deployments.config import Batching

# How many candidate micro-batches (in key order) a pass looks at before it stops trying to merge.
MERGE_SCAN_LIMIT = 64
# Queue waits kept for the percentiles ``stats()`` reports.
RECENT_WAITS = 1024


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dimension]
    token_counts: np.ndarray  # int32 [n]: tokens each input took, special tokens included


OnDone = Callable[["EmbedResult | Exception"], None]


class Ticket(NamedTuple):
    """What ``admit`` hands back: the handle a caller cancels with."""

    seq: int


def batch_cost(lengths: np.ndarray, packed: bool) -> int:
    """Tokens a forward pass over these inputs computes: the sum when packed, else rows x longest."""
    if len(lengths) == 0:
        return 0
    return int(lengths.sum()) if packed else len(lengths) * int(lengths.max())


def plan_call(lengths: np.ndarray, batching: Batching, packed: bool) -> list[np.ndarray]:
    """A call's own micro-batches: the optimal length-sorted cut of its inputs (row indices)."""
    return plan_micro_batches(
        lengths, batching.max_batch_tokens, batching.max_batch_size, batching.forward_overhead_tokens, packed
    ).batches


def form_pass(candidates: Sequence[np.ndarray], batching: Batching, packed: bool) -> list[int]:
    """Which candidate micro-batches (token lengths, in priority order) run together in the next pass.

    The first always runs. Each later one joins while the union fits the budget and merging pays: the
    union's tokens are no more than the parts' plus one pass's overhead.
    """
    chosen = [0]
    lengths = candidates[0]
    rows, longest, total = len(lengths), int(lengths.max()), int(lengths.sum())
    cost = batch_cost(lengths, packed)
    for k in range(1, min(len(candidates), MERGE_SCAN_LIMIT)):
        cand = candidates[k]
        u_rows, u_longest, u_total = rows + len(cand), max(longest, int(cand.max())), total + int(cand.sum())
        if u_rows > batching.max_batch_size:
            continue
        u_cost = u_total if packed else u_rows * u_longest
        if u_cost > batching.max_batch_tokens:
            continue
        if u_cost > cost + batch_cost(cand, packed) + batching.forward_overhead_tokens:
            continue
        chosen.append(k)
        rows, longest, total, cost = u_rows, u_longest, u_total, u_cost
        if rows == batching.max_batch_size:
            break
    return chosen


@dataclass(eq=False)
class _Call:
    seq: int
    items: list[EncodedText]
    lengths: np.ndarray
    batches: deque[np.ndarray]  # queued micro-batches: row indices into items
    normalize: bool
    on_done: OnDone
    admitted_at: float
    vectors: np.ndarray
    rows_left: int
    queued_cost: int
    credit: int = 0  # tokens run for other calls while this one had queued rows
    started_at: float | None = None
    closed: bool = False  # answered, failed or cancelled: nothing more is computed for it

    @property
    def key(self) -> int:
        return self.queued_cost - self.credit


@dataclass
class _Pass:
    parts: list[tuple[_Call, np.ndarray]]
    items: list[EncodedText]
    real_tokens: int
    padded_tokens: int


@dataclass
class SchedulerStats:
    """Counters at the decision point; ``stats()`` adds the gauges and the derived figures."""

    calls: int = 0  # admitted
    inputs: int = 0  # admitted
    answered_calls: int = 0
    failed_calls: int = 0
    cancelled_calls: int = 0
    dropped_inputs: int = 0  # queued rows removed because their caller left
    abandoned_inputs: int = 0  # rows computed in a pass whose caller left while it ran
    forward_passes: int = 0
    rows: int = 0  # rows computed (retries of a failed pass included)
    real_tokens: int = 0
    padded_tokens: int = 0
    max_pass_rows: int = 0
    max_pass_tokens: int = 0
    forward_seconds: float = 0.0
    queue_wait_seconds_sum: float = 0.0  # admission -> first row in a pass, per call
    queue_wait_seconds_max: float = 0.0
    recent_waits: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_WAITS))


class Scheduler:
    def __init__(
        self, backend: EmbeddingBackend, batching: Batching, clock: Callable[[], float] = time.monotonic
    ):
        self.backend = backend
        self.batching = batching
        self.clock = clock
        self._calls: dict[int, _Call] = {}  # open calls with queued rows or rows in the running pass
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stats = SchedulerStats()
        self._stopping = False

    # ---- called from the event loop ------------------------------------------------------------
    def admit(
        self, items: list[EncodedText], batches: list[np.ndarray], normalize: bool, on_done: OnDone
    ) -> Ticket:
        """Queue a tokenised, planned call; ``on_done`` gets its ``EmbedResult`` or the exception."""
        lengths = np.fromiter((it.length for it in items), dtype=np.int64, count=len(items))
        packed = self.backend.packed
        call = _Call(
            seq=next(self._seq),
            items=items,
            lengths=lengths,
            batches=deque(batches),
            normalize=normalize,
            on_done=on_done,
            admitted_at=self.clock(),
            vectors=np.zeros((len(items), self.backend.dimension), dtype=np.float32),
            rows_left=len(items),
            queued_cost=sum(batch_cost(lengths[b], packed) for b in batches),
        )
        with self._cond:
            self._stats.calls += 1
            self._stats.inputs += len(items)
            if not items:
                call.closed = True
                self._stats.answered_calls += 1
            else:
                self._calls[call.seq] = call
                self._cond.notify()
        if not items:
            on_done(_finish(call))
        return Ticket(call.seq)

    def cancel(self, ticket: Ticket) -> int:
        """The caller left: drop its queued rows (none of them will be computed). Returns how many."""
        with self._cond:
            call = self._calls.get(ticket.seq)
            if call is None or call.closed:
                return 0
            dropped = self._drop_queued(call)
            call.closed = True
            self._stats.cancelled_calls += 1
            self._stats.dropped_inputs += dropped
            if call.rows_left == 0:  # nothing of it is running: forget it now
                del self._calls[call.seq]
            return dropped

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- called on the model thread ------------------------------------------------------------
    def run_forever(self, idle_wait_s: float = 0.0) -> None:
        """Run passes until ``stop``. Coming out of idle, wait ``idle_wait_s`` so that calls arriving
        together share the first pass."""
        while True:
            with self._cond:
                if not self._has_work():
                    while not self._has_work() and not self._stopping:
                        self._cond.wait()
                    if idle_wait_s > 0 and not self._stopping:
                        self._cond.wait(idle_wait_s)
                if self._stopping:
                    return
            self.step()

    def step(self) -> bool:
        """Form and run one pass, then answer the calls it finished; False when nothing is queued."""
        with self._cond:
            batch = self._next_pass()
        if batch is None:
            return False
        started = self.clock()
        outputs, failures, passes = self._forward(batch.items)
        elapsed = self.clock() - started
        with self._cond:
            answers = self._deliver(batch, outputs, failures, passes, elapsed)
        for on_done, result in answers:
            on_done(result)
        return True

    def _has_work(self) -> bool:
        return any(c.batches for c in self._calls.values())

    def _next_pass(self) -> _Pass | None:
        waiting = sorted((c for c in self._calls.values() if c.batches), key=lambda c: (c.key, c.seq))
        if not waiting:
            return None
        candidates: list[tuple[_Call, int]] = []
        for call in waiting:
            candidates.extend((call, k) for k in range(len(call.batches)))
            if len(candidates) >= MERGE_SCAN_LIMIT:
                break
        packed = self.backend.packed
        chosen = form_pass([c.lengths[c.batches[k]] for c, k in candidates], self.batching, packed)
        picked: dict[int, list[int]] = {}
        for i in chosen:
            call, k = candidates[i]
            picked.setdefault(call.seq, []).append(k)
        parts: list[tuple[_Call, np.ndarray]] = []
        now = self.clock()
        for seq, ks in picked.items():
            call = self._calls[seq]
            rows = [call.batches[k] for k in ks]
            for k in sorted(ks, reverse=True):
                del call.batches[k]
            call.queued_cost -= sum(batch_cost(call.lengths[r], packed) for r in rows)
            parts.append((call, np.concatenate(rows)))
            if call.started_at is None:
                call.started_at = now
                self._record_wait(now - call.admitted_at)
        items = [call.items[int(i)] for call, rows in parts for i in rows]
        lengths = np.fromiter((it.length for it in items), dtype=np.int64, count=len(items))
        padded = batch_cost(lengths, packed)
        for call in waiting:  # ageing: the waiting calls that sit this pass out
            if call.seq not in picked:
                call.credit += padded
        return _Pass(parts, items, int(lengths.sum()), padded)

    def _record_wait(self, wait: float) -> None:
        s = self._stats
        s.queue_wait_seconds_sum += wait
        s.queue_wait_seconds_max = max(s.queue_wait_seconds_max, wait)
        s.recent_waits.append(wait)

    def _forward(self, items: list[EncodedText]) -> tuple[np.ndarray, dict[int, Exception], int]:
        """Vectors for a pass, the rows whose forward fails (found by running them one by one), and the
        number of forward passes that took."""
        try:
            return self.backend.forward(items), {}, 1
        except Exception as exc:  # noqa: BLE001 - isolate the failing rows below
            if len(items) == 1:
                return np.zeros((1, self.backend.dimension), np.float32), {0: exc}, 1
        out = np.zeros((len(items), self.backend.dimension), dtype=np.float32)
        failures: dict[int, Exception] = {}
        for i, item in enumerate(items):
            try:
                out[i] = self.backend.forward([item])[0]
            except Exception as exc:  # noqa: BLE001
                failures[i] = exc
        return out, failures, 1 + len(items)

    def _deliver(
        self, batch: _Pass, outputs: np.ndarray, failures: dict[int, Exception], passes: int, elapsed: float
    ) -> list[tuple[OnDone, EmbedResult | Exception]]:
        s = self._stats
        s.forward_passes += passes
        s.rows += len(batch.items) * (1 if passes == 1 else 2)
        s.real_tokens += batch.real_tokens
        s.padded_tokens += batch.padded_tokens
        s.max_pass_rows = max(s.max_pass_rows, len(batch.items))
        s.max_pass_tokens = max(s.max_pass_tokens, batch.padded_tokens)
        s.forward_seconds += elapsed
        answers: list[tuple[OnDone, EmbedResult | Exception]] = []
        start = 0
        for call, rows in batch.parts:
            end = start + len(rows)
            call.rows_left -= len(rows)
            if call.closed:  # cancelled while the pass ran
                s.abandoned_inputs += len(rows)
            else:
                failed = [i for i in range(start, end) if i in failures]
                if failed:
                    index = int(rows[failed[0] - start])
                    error = RuntimeError(f"embedding failed for input[{index}]: {failures[failed[0]]!r}")
                    answers.append((call.on_done, error))
                    self._close(call, failed=True)
                else:
                    call.vectors[rows] = outputs[start:end]
                    if call.rows_left == 0:
                        result = _finish(call)
                        answers.append((call.on_done, result))
                        self._close(call, failed=isinstance(result, Exception))
            if call.rows_left == 0:
                self._calls.pop(call.seq, None)
            start = end
        return answers

    def _close(self, call: _Call, failed: bool) -> None:
        call.closed = True
        if failed:
            self._stats.failed_calls += 1
            self._drop_queued(call)
        else:
            self._stats.answered_calls += 1

    @staticmethod
    def _drop_queued(call: _Call) -> int:
        dropped = sum(len(b) for b in call.batches)
        call.batches.clear()
        call.queued_cost = 0
        call.rows_left -= dropped
        return dropped

    # ---- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """Counters since start, the queue now, and what they imply (padding efficiency, waits)."""
        with self._cond:
            s = self._stats
            out: dict[str, float | int] = {k: v for k, v in vars(s).items() if k != "recent_waits"}
            queued = [c.lengths[b] for c in self._calls.values() for b in c.batches]
            out["queue_calls"] = sum(1 for c in self._calls.values() if c.batches)
            waits = sorted(s.recent_waits)
        out["queue_inputs"] = sum(len(q) for q in queued)
        out["queue_tokens"] = sum(int(q.sum()) for q in queued)
        out["padding_efficiency"] = s.real_tokens / s.padded_tokens if s.padded_tokens else 1.0
        out["rows_per_pass"] = s.rows / s.forward_passes if s.forward_passes else 0.0
        out["queue_wait_seconds_p50"] = _percentile(waits, 0.50)
        out["queue_wait_seconds_p99"] = _percentile(waits, 0.99)
        return out


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _finish(call: _Call) -> EmbedResult | Exception:
    """The call's answer: normalised if asked, refused if the model produced non-finite values."""
    out = call.vectors
    if call.normalize and len(out):
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    if not np.isfinite(out).all():
        return RuntimeError("the model produced non-finite values")
    return EmbedResult(np.ascontiguousarray(out, dtype=np.float32), call.lengths.astype(np.int32))
