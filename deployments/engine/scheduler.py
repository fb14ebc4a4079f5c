"""The replica's scheduler: one queue of tokenised inputs, one decision per forward pass.

Calls arrive tokenised (the engine tokenises on its own thread, so tokenising overlaps the forward pass).
The scheduler owns every queued input and, before each forward pass, decides which inputs run together.
Each call is answered the moment its last row is done; a cancelled call's queued rows leave the queue
and no later pass includes them.

Policy: **shortest remaining work first, aged by the work done for calls that overtook it.** A call's
key is

    key = tokens of its queued inputs - 2 x tokens run for newer calls in passes it sat out

(a small call, a query, is aged by the whole of every pass it sits out), and the call with the lowest key
(then the oldest) goes first. Why this one:

- A small call that arrives during bulk work has a tiny key, so its rows lead the very next pass: it
  waits for at most the pass in progress and its own, and its own is a short one (planning, below).
  Shortest-first also minimises mean response time.
- Ageing bounds starvation without a clock: a waiting call's key falls by twice the tokens run for calls
  that came after it, so once those have run half as many tokens as it has left, its key is <= 0 and no
  call that arrives later (key = its size > 0) overtakes it. A bulk call under a stream of small ones is
  delayed by at most half its own remaining work.
- Only by newer calls' work: waiting behind an older call is arrival order, not being overtaken. Aged
  for it, the requests a client cuts a big ``encode`` into (several in flight at once) fell below any
  newcomer's key while the first ran, and a query arriving later waited for all of them (up to 25 s on a
  CPU). Bulk calls of one size therefore run in arrival order; a smaller one goes first.
- A small call ages behind older calls too, by twice what it sits out, so one that waits behind a bulk
  call that ageing put first (key <= 0, falling only by what it is served) gets in within a few passes.
- While small calls keep coming in, ``batching.interactive_pass_ms`` cuts passes to about that time, so
  the pass in progress, which a query always waits for, is short (``pass_budget``).

Planning: the queue's inputs are planned jointly, as one request's would be (``plan_micro_batches``: sort
by length, cut optimally under the token budget and row cap, trading padding against the per-pass
overhead). The plan covers a window of the queue, filled in key order (each call's inputs shortest
first) up to ``window_rows``, which bounds the planner's cost, and its micro-batches run in key order of
their most urgent call. It is reused pass after pass until a call arrives, leaves or fails; then the
window is planned again, so a newcomer's rows join the next pass, riding along with others' rows where
the optimal cut puts them, unless riding along would make a small call's pass (a query's) several times
longer than one of its own: then small calls are planned apart (``plan_passes``).

Deficit round-robin was the other candidate: it shares passes equally between calls, which makes a
one-text call wait for a turn behind every active call, and it needs a quantum tuned per model.

Failure isolation: a pass that raises is run again row by row; a failing row fails only its own call
(naming the input), whose remaining rows then leave the queue. Non-finite output fails its call.

Device faults (``deployments/engine/device_faults.py``): a pass that runs out of device memory frees the
allocator's cache and runs again split in two, down to single inputs (one that does not fit alone fails
its own call); the planner's token budget drops to half of that pass and is earned back while passes
succeed. A poisoned CUDA context fails every open call with ``DeviceFault`` (retryable elsewhere) and
marks the scheduler faulted: later calls are refused at once and the replica's health check fails, so
Serve replaces it.

Thread model: ``admit`` and ``cancel`` come from the event loop, passes run on one model thread
(``run_forever`` or ``step``); queue state is guarded by one lock, and neither the planner nor the forward
pass runs under it (the planner works on a window of the queue taken under the lock). Callbacks are
invoked on the model thread, outside the lock.

No idle device between passes: where the backend's passes are asynchronous (CUDA:
``backends/device_pass.py``), the model thread plans and launches pass N+1 before it reads pass N back, so
the device runs N+1 while N's vectors come back and its callers are answered. It launches N+1 just before
N is expected to end (``launch_timing.py``), not as N starts, so a call that arrives while N runs still
joins N+1 (unless it comes in N's last tenth or so). On a CPU a pass computes where it is launched, so
each pass is read back before the next is planned.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from deployments.config import Batching
from deployments.engine.backends.base import DonePass, EmbeddingBackend, EncodedText, PendingPass
from deployments.engine.device_faults import (
    DeviceAlreadyFailed,
    DeviceFault,
    DeviceMemoryError,
    TokenBudget,
    is_out_of_memory,
    is_poisoned_context,
)
from deployments.engine.launch_timing import POLL_S, LaunchTiming
from deployments.engine.planner import batch_cost, plan_micro_batches
from deployments.protocol.errors import ModelError
from deployments.protocol.options import EmbedResult
from deployments.protocol.vectors import l2_normalize

log = logging.getLogger(__name__)

# How much faster a waiting call ages than a running one is served (see the policy above).
AGEING_RATE = 2
# Queue waits kept for the percentiles ``stats()`` reports.
RECENT_WAITS = 1024


OnDone = Callable[["EmbedResult | Exception"], None]


class SchedulerObserver(Protocol):
    """Told at each decision (metrics export in the Ray shell); called on the scheduler's threads."""

    def queue(self, inputs: int, tokens: int) -> None: ...
    def admitted(self, inputs: int) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def ran_pass(self, rows: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...
    def dropped(self, inputs: int) -> None: ...


class NoObserver:
    def queue(self, inputs: int, tokens: int) -> None:
        pass

    def admitted(self, inputs: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def ran_pass(self, rows: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        pass

    def dropped(self, inputs: int) -> None:
        pass


class Ticket(NamedTuple):
    """What ``admit`` hands back: the handle a caller cancels with."""

    seq: int


@dataclass(eq=False)
class _Call:
    seq: int
    items: list[EncodedText]
    lengths: np.ndarray
    by_length: np.ndarray  # row indices, shortest first
    queued: np.ndarray  # bool per row: not yet in a pass
    queued_rows: int
    queued_tokens: int
    normalize: bool
    on_done: OnDone
    admitted_at: float
    vectors: np.ndarray
    rows_left: int  # rows not yet computed: queued or in the running pass
    aged: int = 0  # AGEING_RATE x tokens run for newer calls in the passes it sat out with queued rows
    started_at: float | None = None
    closed: bool = False  # answered, failed or cancelled: nothing more is computed for it

    @property
    def key(self) -> tuple[int, int]:
        return (self.queued_tokens - self.aged, self.seq)

    @classmethod
    def new(cls, seq: int, items: list[EncodedText], normalize: bool, on_done: OnDone, now: float, dim: int):
        lengths = np.fromiter((it.length for it in items), dtype=np.int64, count=len(items))
        return cls(
            seq=seq,
            items=items,
            lengths=lengths,
            by_length=np.argsort(lengths, kind="stable"),
            queued=np.ones(len(items), dtype=bool),
            queued_rows=len(items),
            queued_tokens=int(lengths.sum()),
            normalize=normalize,
            on_done=on_done,
            admitted_at=now,
            vectors=np.zeros((len(items), dim), dtype=np.float32),
            rows_left=len(items),
        )

    def queued_by_length(self) -> np.ndarray:
        return self.by_length[self.queued[self.by_length]]

    def take(self, rows: np.ndarray) -> int:
        """Rows leave the queue for a pass; returns their tokens."""
        tokens = int(self.lengths[rows].sum())
        self.queued[rows] = False
        self.queued_rows -= len(rows)
        self.queued_tokens -= tokens
        return tokens

    def receive(
        self, rows: np.ndarray, vectors: np.ndarray, failure: tuple[int, Exception] | None, now: float
    ) -> EmbedResult | Exception | None:
        """A pass's rows for this call (``failure``: the first failing one's place in ``rows``, and why):
        its error, or its answer once every row is in; None while rows remain."""
        if failure is not None:
            offset, error = failure
            return ModelError(f"embedding failed: {error!r}", index=int(rows[offset]))
        self.vectors[rows] = vectors
        return _finish(self, now) if self.rows_left == 0 else None

    def drop_queued(self) -> tuple[int, int]:
        """Every queued row leaves without being computed; returns (rows, tokens) dropped."""
        dropped = (self.queued_rows, self.queued_tokens)
        self.queued[:] = False
        self.queued_rows = self.queued_tokens = 0
        self.rows_left -= dropped[0]
        return dropped


@dataclass
class _Pass:
    parts: list[tuple[_Call, np.ndarray]]  # (call, its rows in this pass)
    items: list[EncodedText]
    real_tokens: int
    padded_tokens: int
    pending: PendingPass | None = None  # once launched
    launched_at: float = 0.0
    launch_failed: bool = False  # raised at launch (out of memory allocating, say): read back alone


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
    device_seconds: float = 0.0  # the device's own time for its passes, where it times them (CUDA events)
    out_of_memory_passes: int = 0  # planned passes that ran out of device memory (and ran again split)
    cut_passes: int = 0  # passes planned shorter while queries were served (batching.interactive_pass_ms)
    queue_wait_seconds_sum: float = 0.0  # admission -> first row in a pass, per call
    queue_wait_seconds_max: float = 0.0
    recent_waits: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_WAITS))
    # Asynchronous devices: passes launched while another ran, and those of them launched only after it
    # had ended (the device idled: the launch estimate came late, or the host was slow).
    launches_behind_a_pass: int = 0
    launches_after_it_ended: int = 0
    # A pass's time against the estimate made before it ran (device time / expected - 1): the error the
    # launch lead (``launch_timing.LEAD_SHARE``) must cover.
    recent_estimate_errors: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_WAITS))

    def record_wait(self, wait: float) -> None:
        self.queue_wait_seconds_sum += wait
        self.queue_wait_seconds_max = max(self.queue_wait_seconds_max, wait)
        self.recent_waits.append(wait)

    def record_pass(
        self, rows: int, passes: int, real_tokens: int, padded_tokens: int, seconds: float
    ) -> None:
        """One planned pass: ``passes`` > 1 when it failed and ran again (split, or row by row)."""
        self.forward_passes += passes
        self.rows += rows * (1 if passes == 1 else 2)
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.max_pass_rows = max(self.max_pass_rows, rows)
        self.max_pass_tokens = max(self.max_pass_tokens, padded_tokens)
        self.forward_seconds += seconds

    def report(self) -> dict[str, float | int]:
        """The counters and what they imply (padding efficiency, rows per pass, wait percentiles)."""
        out: dict[str, float | int] = {k: v for k, v in vars(self).items() if not k.startswith("recent_")}
        waits = sorted(self.recent_waits)
        out["padding_efficiency"] = self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
        out["rows_per_pass"] = self.rows / self.forward_passes if self.forward_passes else 0.0
        out["queue_wait_seconds_p50"] = _percentile(waits, 0.50)
        out["queue_wait_seconds_p99"] = _percentile(waits, 0.99)
        errors = sorted(self.recent_estimate_errors)
        for q in (10, 50, 90):
            out[f"pass_estimate_error_p{q}"] = _percentile(errors, q / 100)
        return out


@dataclass
class Window:
    """The queue's most urgent inputs, taken under the lock so they can be planned outside it: the calls in
    key order (most urgent first) and the queued rows of each, shortest first."""

    owners: list[_Call]
    rows: list[np.ndarray]
    queued_tokens: list[int]  # each owner's queued tokens when the window was taken (all, not the window's)


def queue_window(calls: list[_Call], window_rows: int) -> Window:
    """Up to ``window_rows`` queued inputs, filled in key order (each call's inputs shortest first)."""
    window = Window([], [], [])
    room = window_rows
    for call in sorted((c for c in calls if c.queued_rows), key=lambda c: c.key):
        if room <= 0:
            break
        take = call.queued_by_length()[:room]
        window.owners.append(call)
        window.rows.append(take)
        window.queued_tokens.append(call.queued_tokens)
        room -= len(take)
    return window


# A call whose queued work fits in this share of a pass is *small* (a query, a few entity names).
SMALL_CALL_SHARE = 1 / 8
# Small calls get passes of their own when riding along would make their pass cost this many times more.
RIDE_ALONG_LIMIT = 4


# Passes stay cut (``batching.interactive_pass_ms``) for this many capped passes' time after the last
# small call came in: a retriever's next query is likely within seconds of its last.
INTERACTIVE_HOLD_PASSES = 20


def pass_budget(
    batching: Batching, budget_now: int, seconds_per_token: float | None, floor: int, since_small_s: float
) -> tuple[int, bool]:
    """Tokens the next plan's passes may hold, and whether they were cut for a waiting query. A query waits
    for the pass in progress (0.5-1.1 s for a full NV-Embed-v2 pass on a GPU, seconds for bge-large on a
    CPU), so while small calls keep coming (the last ``since_small_s`` ago, within the hold), passes are cut
    to take about ``interactive_pass_ms`` by the measured time per token of work (the planner's cost model:
    padded tokens plus the pass's fixed cost), never below ``floor`` (one input of ``max_seq_length`` must
    fit). No estimate yet, or no cap configured: ``budget_now``."""
    cap_ms = batching.interactive_pass_ms
    if cap_ms is None or seconds_per_token is None:
        return budget_now, False
    if since_small_s > INTERACTIVE_HOLD_PASSES * cap_ms / 1000:
        return budget_now, False
    fits = int(cap_ms / 1000 / seconds_per_token) - (batching.forward_overhead_tokens or 0)
    capped = max(floor, fits)
    return (capped, True) if capped < budget_now else (budget_now, False)


def plan_passes(window: Window, batching: Batching, packed: bool) -> list[list[tuple[_Call, np.ndarray]]]:
    """The window's passes, planned jointly as one request's would be; each pass as (call, its rows), most
    urgent call first, the passes in order of urgency. Reads only the window (safe outside the lock).

    Small calls beside larger ones are planned apart when riding along would cost them too much: the
    joint plan puts a query's one row in a pass of a thousand others' (a full 16k-token pass of a 7B
    model: 0.5-0.8 s on a GPU), where a pass of its own costs the pass's fixed cost and its tokens. So
    when the joint pass carrying small calls' rows costs more than ``RIDE_ALONG_LIMIT`` times their own
    pass, the small calls are planned together and the others together; the passes still run in order of
    urgency, so an aged bulk call keeps its place and a query waits for the pass in progress and a short
    one of its own. The others pay one short pass's time per plan that has small calls in it.
    ``batching.small_calls_apart: false`` plans every call jointly."""
    everyone = list(range(len(window.owners)))
    if not everyone:
        return []
    plan = _plan_group(window, everyone, batching, packed)
    small_limit = batching.max_batch_tokens * SMALL_CALL_SHARE
    small = {k for k in everyone if window.queued_tokens[k] <= small_limit}
    if batching.small_calls_apart and small and len(small) < len(everyone):
        apart = _plan_group(window, sorted(small), batching, packed)
        riding = max(p.cost for p in plan if small.intersection(p.callers))
        if riding > RIDE_ALONG_LIMIT * max(p.cost for p in apart):
            rest = _plan_group(window, [k for k in everyone if k not in small], batching, packed)
            plan = sorted(apart + rest, key=lambda p: p.rank)
    return [p.parts for p in plan]


class _PlannedPass(NamedTuple):
    rank: int  # the window's index of its most urgent call
    callers: list[int]  # the window's indices of its calls, most urgent first
    parts: list[tuple[_Call, np.ndarray]]
    cost: int  # padded tokens plus the pass's fixed cost


def _plan_group(window: Window, group: list[int], batching: Batching, packed: bool) -> list[_PlannedPass]:
    """The passes of the window's calls ``group`` (indices in key order) planned jointly, in order of
    urgency (a pass's urgency: its most urgent call's)."""
    rows = [window.rows[k] for k in group]
    owner_of = np.repeat(np.asarray(group), [len(r) for r in rows])
    row_of = np.concatenate(rows)
    lengths = np.concatenate([window.owners[k].lengths[r] for k, r in zip(group, rows, strict=True)])
    b = batching
    plan = plan_micro_batches(
        lengths, b.max_batch_tokens, b.max_batch_size, b.forward_overhead_tokens, packed
    )
    passes = []
    for batch in plan.batches:
        who = owner_of[batch]
        callers = [int(k) for k in np.unique(who)]  # sorted: in key order, most urgent first
        parts = [(window.owners[k], row_of[batch[who == k]]) for k in callers]
        cost = batch_cost(lengths[batch], packed) + (b.forward_overhead_tokens or 0)
        passes.append(_PlannedPass(callers[0], callers, parts, cost))
    passes.sort(key=lambda p: p.rank)  # stable: equal urgency stays shortest first
    return passes


@dataclass
class PassOutcome:
    """What running one planned pass gave: a vector per row, the rows that failed (and why), the forward
    passes that took, and whether the device ran out of memory on the way."""

    vectors: np.ndarray
    failures: dict[int, Exception]
    passes: int
    out_of_memory: bool = False


def forward_isolating(
    backend: EmbeddingBackend, items: list[EncodedText], launched: PendingPass | None = None
) -> PassOutcome:
    """Vectors for a pass (``launched``: the pass already started, whose result is read here). A pass that
    raises is run again: split in two after an out-of-memory error (cached device memory freed first),
    else row by row, so only the failing rows fail. A poisoned device context raises ``DeviceFault``:
    nothing more can run in this process."""
    try:
        out = launched.result() if launched is not None else backend.forward(items)
        return PassOutcome(_checked(backend, items, out), {}, 1)
    except Exception as exc:  # noqa: BLE001 - isolate the failing rows below
        if is_poisoned_context(exc):
            raise DeviceFault(f"the device failed and cannot recover in this replica: {exc}") from exc
        if is_out_of_memory(exc):
            backend.release_memory()
            return _split_after_oom(backend, items, exc)
        if len(items) == 1:
            return PassOutcome(np.zeros((1, backend.dimension), np.float32), {0: exc}, 1)
    out = np.zeros((len(items), backend.dimension), dtype=np.float32)
    failures: dict[int, Exception] = {}
    for i, item in enumerate(items):
        try:
            out[i] = _checked_forward(backend, [item])[0]
        except Exception as exc:  # noqa: BLE001
            if is_poisoned_context(exc):
                raise DeviceFault(f"the device failed and cannot recover in this replica: {exc}") from exc
            failures[i] = exc
    return PassOutcome(out, failures, 1 + len(items))


def _split_after_oom(backend: EmbeddingBackend, items: list[EncodedText], error: Exception) -> PassOutcome:
    """The pass again as two halves (each split further while it does not fit); an input that does not
    fit alone fails on its own."""
    if len(items) == 1:
        too_big = DeviceMemoryError(
            f"it needs more device memory than this replica has free, even alone ({items[0].length} tokens; "
            f"truncate it or serve the model on a larger device): {error}"
        )
        return PassOutcome(np.zeros((1, backend.dimension), np.float32), {0: too_big}, 1, out_of_memory=True)
    half = len(items) // 2
    left, right = forward_isolating(backend, items[:half]), forward_isolating(backend, items[half:])
    failures = {**left.failures, **{half + i: exc for i, exc in right.failures.items()}}
    vectors = np.concatenate([left.vectors, right.vectors])
    return PassOutcome(vectors, failures, 1 + left.passes + right.passes, out_of_memory=True)


def _checked_forward(backend: EmbeddingBackend, items: list[EncodedText]) -> np.ndarray:
    return _checked(backend, items, backend.forward(items))


def _checked(backend: EmbeddingBackend, items: list[EncodedText], out: np.ndarray) -> np.ndarray:
    expected = (len(items), backend.dimension)
    if getattr(out, "shape", None) != expected:
        raise RuntimeError(f"the model returned shape {getattr(out, 'shape', None)}, expected {expected}")
    return out


class Scheduler:
    def __init__(
        self,
        backend: EmbeddingBackend,
        batching: Batching,
        clock: Callable[[], float] = time.monotonic,
        window_rows: int | None = None,
        observer: SchedulerObserver | None = None,
        just_in_time: bool = True,
    ):
        """``just_in_time``: on an asynchronous device, launch the next pass just before the running one is
        expected to end (False: as soon as the running one is launched; the benchmarks compare the two)."""
        if batching.forward_overhead_tokens is None:
            raise ValueError("batching.forward_overhead_tokens unresolved: EmbeddingEngine measures it")
        self.backend = backend
        self.observer: SchedulerObserver = observer or NoObserver()
        self._queued_inputs = 0  # totals over all calls, for the queue gauges
        self._queued_tokens = 0
        self.batching = batching
        self.clock = clock
        # Inputs planned together: enough for a few full passes, few enough to plan in milliseconds.
        self.window_rows = window_rows or max(512, 2 * batching.max_batch_size)
        self._calls: dict[int, _Call] = {}  # open calls with queued rows or rows in the running pass
        self._plan: deque[list[tuple[_Call, np.ndarray]]] = deque()  # planned passes, most urgent first
        self._stale = False  # a call arrived, left or failed since the plan was made
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stats = SchedulerStats()
        self._stopping = False
        # Tokens a pass may hold now: max_batch_tokens until the device runs out of memory. Never below
        # the longest input, which must fit a pass of its own.
        self.budget = TokenBudget(batching.max_batch_tokens, floor=backend.max_seq_length)
        self.fault: DeviceFault | None = None  # set once the device failed for good: see health()
        # The pass launched and not yet read back (model thread only), and when the last one was.
        self._running: _Pass | None = None
        self._last_finished = 0.0
        self.just_in_time = just_in_time
        self.launch_timing = LaunchTiming(batching.forward_overhead_tokens)
        # When a small call (a query) last came in, and whether the plan's passes were cut for one
        # (``pass_budget``): the plan is made again when that changes.
        self._small_tokens = batching.max_batch_tokens * SMALL_CALL_SHARE
        self._last_small_at = -float("inf")
        self._plan_cut = False

    # ---- called from the event loop ------------------------------------------------------------
    def admit(self, items: list[EncodedText], normalize: bool, on_done: OnDone) -> Ticket:
        """Queue a tokenised call; ``on_done`` gets its ``EmbedResult`` or the exception that sank it."""
        call = _Call.new(next(self._seq), items, normalize, on_done, self.clock(), self.backend.dimension)
        if self.fault is not None:  # nothing can run here any more: the caller should go elsewhere
            refusal = f"this replica's device failed earlier; it is being replaced: {self.fault}"
            on_done(DeviceAlreadyFailed(refusal))
            return Ticket(call.seq)
        with self._cond:
            self._stats.calls += 1
            self._stats.inputs += len(items)
            self.observer.admitted(len(items))
            if items:
                self._calls[call.seq] = call
                self._stale = True
                if call.queued_tokens <= self._small_tokens:
                    self._last_small_at = call.admitted_at
                self._queue_changed(len(items), call.queued_tokens)
                self._cond.notify()
            else:
                call.closed = True
                self._stats.answered_calls += 1
        if not items:
            on_done(_finish(call, call.admitted_at))
        return Ticket(call.seq)

    def cancel(self, ticket: Ticket) -> int:
        """The caller left: drop its queued rows (none of them will be computed). Returns how many."""
        with self._cond:
            call = self._calls.get(ticket.seq)
            if call is None or call.closed:
                return 0
            call.closed = True
            dropped = self._drop_queued(call)
            self._stats.cancelled_calls += 1
            self._stats.dropped_inputs += dropped
            self.observer.dropped(dropped)
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
                if self._stopping and self._running is None:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a fault here must not stop the model thread
                log.exception("scheduler step failed; failing the calls in flight")
                self._fail_running(exc)

    def _fail_running(self, error: Exception) -> None:
        """After an unexpected fault: answer every open call with it, so no caller waits forever."""
        self._fail_open_calls(RuntimeError(f"internal error in the model's scheduler: {error!r}"))

    def _fail_open_calls(self, error: Exception) -> None:
        with self._cond:
            calls = [c for c in self._calls.values() if not c.closed]
            for call in calls:
                self._close(call, failed=True)
            self._calls.clear()
            self._plan.clear()
        for call in calls:
            call.on_done(error)

    def health(self) -> None:
        """Raises the device's fault once it failed for good (the replica's health check: Serve then
        replaces the replica); returns None while passes can run."""
        if self.fault is not None:
            raise self.fault

    def step(self) -> bool:
        """Read back one pass and answer the calls it finished; False when nothing is queued or running.
        With an asynchronous backend (CUDA) the next pass is planned and launched first, just before this
        one is expected to end, so the device runs it while this one's vectors are read back and delivered:
        no idle device between passes."""
        running = self._running or self._launch_next()
        if running is None:
            return False
        self._running = None
        if self.backend.asynchronous and not running.launch_failed:
            if self.just_in_time:
                self._wait_for_launch_point(running)
            if not self._stopping:
                ended = running.pending is not None and running.pending.done()
                self._running = self._launch_next()
                if self._running is not None:
                    with self._cond:
                        self._stats.launches_behind_a_pass += 1
                        self._stats.launches_after_it_ended += ended
        self._finish(running)
        return True

    def _wait_for_launch_point(self, running: _Pass) -> None:
        """Sleep until the running pass is about to end (``launch_timing``) or has ended, so calls arriving
        meanwhile can join the next pass. It began on the device when launched, or when the pass before it
        was read back, whichever came later."""
        assert running.pending is not None
        started = max(running.launched_at, self._last_finished)
        point = self.launch_timing.launch_point(started, running.padded_tokens)
        if point is None:
            return
        while not self._stopping and not running.pending.done():
            left = point - self.clock()
            if left <= 0:
                return
            time.sleep(min(POLL_S, left))

    def _launch_next(self) -> _Pass | None:
        began = self.clock()
        batch = self._take_pass()
        if batch is None:
            return None
        batch.launched_at = self.clock()
        try:
            batch.pending = self.backend.launch(batch.items)
        except Exception as exc:  # noqa: BLE001 - handled where the pass is read back (forward_isolating)
            batch.pending = DonePass(error=exc)
            batch.launch_failed = True  # nothing launched behind it: its retries get the device to themselves
        if self.backend.asynchronous:  # elsewhere launching is computing
            self.launch_timing.observe_launch(self.clock() - began)
        return batch

    def _finish(self, batch: _Pass) -> None:
        """Read the pass back (running it again split or row by row if it failed) and answer its calls."""
        try:
            outcome = forward_isolating(self.backend, batch.items, batch.pending)
        except DeviceFault as fault:
            log.error("%s; failing every open call and reporting unhealthy", fault)
            self.fault = fault
            self._running = None  # launched behind the failed pass: its calls fail with the rest
            self._fail_open_calls(fault)
            return
        finished = self.clock()
        # Its own time: from its launch, or from the end of the pass it was queued behind.
        elapsed = finished - max(batch.launched_at, self._last_finished)
        self._last_finished = finished
        device = batch.pending.device_seconds() if batch.pending is not None and outcome.passes == 1 else None
        expected = self.launch_timing.expected_seconds(batch.padded_tokens)
        if outcome.passes == 1:
            self.launch_timing.observe_pass(batch.padded_tokens, elapsed if device is None else device)
        with self._cond:
            if device is not None:
                self._stats.device_seconds += device
                if expected:
                    self._stats.recent_estimate_errors.append(device / expected - 1)
            self._adapt_budget(batch, outcome)
            answers = self._deliver(batch, outcome.vectors, outcome.failures, outcome.passes, elapsed)
        for on_done, result in answers:
            try:
                on_done(result)
            except Exception:  # noqa: BLE001 - one caller's failure must not leave the others unanswered
                log.exception("answering a call failed")

    def _has_work(self) -> bool:
        return self._queued_inputs > 0 or self._running is not None

    def _adapt_budget(self, batch: _Pass, outcome: PassOutcome) -> None:
        """Half the tokens of a pass that ran out of memory for the passes that follow; back up step by
        step while passes fit. Either way the plan is made again with the new budget."""
        if outcome.out_of_memory:
            self._stats.out_of_memory_passes += 1
            self.budget.out_of_memory(batch.padded_tokens)
            self._stale = True
            log.warning(
                "a pass of %d rows, %d tokens ran out of device memory (run again split); passes now hold "
                "at most %d tokens (max_batch_tokens %d)",
                len(batch.items), batch.padded_tokens, self.budget.current, self.budget.ceiling,
            )  # fmt: skip
        elif self.budget.succeeded():
            self._stale = True

    def _take_pass(self) -> _Pass | None:
        """The next pass's rows leave the queue. A plan made stale by an arrival, a departure or a new
        budget is made again from a window of the queue taken under the lock and planned outside it, so
        callers admitting or cancelling never wait for the planner."""
        with self._cond:
            budget, cut = pass_budget(
                self.batching,
                self.budget.current,
                self.launch_timing.seconds_per_token,
                self.budget.floor,
                self.clock() - self._last_small_at,
            )
            if not self._stale and self._plan and cut == self._plan_cut:
                return self._pop_pass()
            self._stale, self._plan_cut = False, cut
            window = queue_window(list(self._calls.values()), self.window_rows)
            batching = self.batching
            if budget != batching.max_batch_tokens:
                batching = batching.model_copy(update={"max_batch_tokens": budget})
        plan = deque(plan_passes(window, batching, self.backend.packed))
        with self._cond:
            self._plan = plan  # a call closed meanwhile is skipped by _pop_pass; one that arrived restales it
            return self._pop_pass()

    def _pop_pass(self) -> _Pass | None:
        while self._plan:
            parts = [(call, rows) for call, rows in self._plan.popleft() if not call.closed]
            if parts:
                break
        else:
            return None
        now = self.clock()
        packed = self.backend.packed
        for call, rows in parts:
            self._queue_changed(-len(rows), -call.take(rows))
            if call.started_at is None:
                call.started_at = now
                self._stats.record_wait(now - call.admitted_at)
                self.observer.waited(now - call.admitted_at)
        items = [call.items[int(i)] for call, rows in parts for i in rows]
        lengths = np.fromiter((it.length for it in items), dtype=np.int64, count=len(items))
        padded = batch_cost(lengths, packed)
        self._stats.cut_passes += self._plan_cut
        self._age_waiting_calls(parts, padded)
        return _Pass(parts, items, int(lengths.sum()), padded)

    def _age_waiting_calls(self, parts: list[tuple[_Call, np.ndarray]], padded: int) -> None:
        """Ageing: a call with queued rows that sits this pass out is aged by the share of it run for calls
        that came after it (it was overtaken); a small call (a query) by the whole pass. Waiting behind older
        calls is arrival order, not being overtaken: aged for it, every request of a big encode in flight
        would fall below any newcomer's key, and a query arriving later would wait for all of them (up to 25 s
        seen on CPU). A small call still ages behind an older bulk call, so it gets in between the passes of
        one that ageing put first."""
        real = [(call.seq, int(call.lengths[rows].sum())) for call, rows in parts]
        total = sum(tokens for _, tokens in real) or 1
        running = {seq for seq, _ in real}
        for call in self._calls.values():
            if not call.queued_rows or call.seq in running:
                continue
            if call.queued_tokens <= self._small_tokens:
                call.aged += AGEING_RATE * padded
            else:
                call.aged += AGEING_RATE * padded * sum(t for seq, t in real if seq > call.seq) // total

    def _queue_changed(self, inputs: int, tokens: int) -> None:
        self._queued_inputs += inputs
        self._queued_tokens += tokens
        self.observer.queue(self._queued_inputs, self._queued_tokens)

    def _deliver(
        self, batch: _Pass, outputs: np.ndarray, failures: dict[int, Exception], passes: int, elapsed: float
    ) -> list[tuple[OnDone, EmbedResult | Exception]]:
        s = self._stats
        s.record_pass(len(batch.items), passes, batch.real_tokens, batch.padded_tokens, elapsed)
        self.observer.ran_pass(len(batch.items), batch.real_tokens, batch.padded_tokens, elapsed)
        answers: list[tuple[OnDone, EmbedResult | Exception]] = []
        start = 0
        for call, rows in batch.parts:
            end = start + len(rows)
            call.rows_left -= len(rows)
            if call.closed:  # cancelled while the pass ran
                s.abandoned_inputs += len(rows)
            else:
                failed = next(((i - start, failures[i]) for i in range(start, end) if i in failures), None)
                answer = call.receive(rows, outputs[start:end], failed, self.clock())
                if answer is not None:
                    answers.append((call.on_done, answer))
                    self._close(call, failed=isinstance(answer, Exception))
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

    def _drop_queued(self, call: _Call) -> int:
        rows, tokens = call.drop_queued()
        self._queue_changed(-rows, -tokens)
        self._stale = True
        return rows

    # ---- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """Counters since start, the queue now, and what they imply (padding efficiency, waits)."""
        with self._cond:
            out = self._stats.report()
            out["max_batch_tokens_now"] = self.budget.current
            out["device_fault"] = int(self.fault is not None)
            out["queue_calls"] = sum(1 for c in self._calls.values() if c.queued_rows)
            out["queue_inputs"] = self._queued_inputs
            out["queue_tokens"] = self._queued_tokens
        return out


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _finish(call: _Call, now: float) -> EmbedResult | Exception:
    """The call's answer: normalised if asked, refused if the model produced non-finite values."""
    out = call.vectors
    if call.normalize and len(out):
        out = l2_normalize(out)
    if not np.isfinite(out).all():
        return ModelError("the model produced non-finite values")
    started = call.started_at if call.started_at is not None else now
    return EmbedResult(
        np.ascontiguousarray(out, dtype=np.float32),
        call.lengths.astype(np.int32),
        queue_seconds=started - call.admitted_at,
        compute_seconds=now - started,
    )
