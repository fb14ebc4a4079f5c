"""Merges concurrent requests for the same model into few downstream calls, adding no wait.

Each hop between Ray Serve replicas costs milliseconds of CPU per call, which on a small machine caps
single-text traffic long before the model does. The coalescer sends a request at once while fewer than
``max_in_flight`` calls are outstanding for its key (the router allows two per model replica);
otherwise the request waits for a free slot and leaves together with every request that queued
meanwhile. Light load sees no added latency; heavy load gets large calls.

A merged call that fails because of an input (a client mistake, or the model failing on it) is sent again
request by request, so the request holding that input fails alone; any other failure (overload, replica
loss) goes to every request of the group as it is, never multiplied into one call per request. Plain
asyncio: no Ray here.

Callers that leave (hang up, time out, are cancelled) cost nothing more than what already runs: a queued
request leaves the queue; a request sent on its own cancels its call; a merged call is cancelled when the
last of its callers has left, and runs on for the ones still waiting (their rows are kept; the rows of
those who left are computed with them, at most ``max_inputs_per_call`` inputs).

Requests of ``direct_min_inputs`` inputs or more skip the lanes: merging gains a request that large
nothing, and it must not hold the slots that small requests merge through while the model (whose
scheduler serves small calls first) works through it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from deployments.embed_options import EmbedResult
from deployments.errors import ClientError, ModelError

# send(key, texts) -> the call's EmbedResult (a merged call's timings go to each of its requests unchanged)
Send = Callable[[Hashable, list[str]], Awaitable[EmbedResult]]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future


@dataclass
class _Lane:
    in_flight: int = 0
    queue: list[_Pending] = field(default_factory=list)


class Coalescer:
    def __init__(
        self,
        send: Send,
        max_in_flight: int | Callable[[Hashable], int] = 2,
        max_inputs_per_call: int = 256,
        direct_min_inputs: int = 64,
    ):
        self._send = send
        self._limit = max_in_flight if callable(max_in_flight) else (lambda _key: max_in_flight)
        self._max_inputs = max_inputs_per_call
        self._direct_min = direct_min_inputs
        self._lanes: dict[Hashable, _Lane] = {}
        self.calls_cancelled = 0  # merged calls cancelled because every caller had left

    async def submit(self, key: Hashable, texts: list[str]) -> EmbedResult:
        if len(texts) >= self._direct_min:
            return await self._send(key, texts)
        lane = self._lanes.setdefault(key, _Lane())
        if lane.in_flight < self._limit(key) and not lane.queue:
            lane.in_flight += 1
            try:
                return await self._send(key, texts)
            finally:
                lane.in_flight -= 1
                self._drain(key, lane)
        future = asyncio.get_running_loop().create_future()
        lane.queue.append(_Pending(texts, future))
        return await future

    def _drain(self, key: Hashable, lane: _Lane) -> None:
        """Start one merged call with as much of the queue as fits, if a slot is free."""
        lane.queue = [p for p in lane.queue if not p.future.done()]  # callers that gave up
        if not lane.queue or lane.in_flight >= self._limit(key):
            if not lane.queue and not lane.in_flight:
                self._lanes.pop(key, None)
            return
        group, total = [], 0
        while lane.queue and (not group or total + len(lane.queue[0].texts) <= self._max_inputs):
            pending = lane.queue.pop(0)
            group.append(pending)
            total += len(pending.texts)
        lane.in_flight += 1
        # A fresh context: the merged call belongs to no single request, so Ray must not cancel it with
        # the request whose completion happened to start it; it is cancelled when all its callers left.
        task = contextvars.Context().run(asyncio.ensure_future, self._run_group(key, lane, group))

        abandoned = False

        def caller_left(future: asyncio.Future) -> None:
            nonlocal abandoned
            if abandoned or not future.cancelled() or task.done():
                return
            if all(p.future.done() for p in group):
                abandoned = True
                self.calls_cancelled += 1
                task.cancel()

        for pending in group:
            pending.future.add_done_callback(caller_left)

    async def _run_group(self, key: Hashable, lane: _Lane, group: list[_Pending]) -> None:
        try:
            if len(group) == 1:
                await self._deliver(key, group[0])
                return
            texts = [t for p in group for t in p.texts]
            try:
                result = await self._send(key, texts)
            except (ClientError, ModelError):  # an input's fault: each request on its own finds its owner
                await asyncio.gather(*(self._deliver(key, p) for p in group))
                return
            except Exception as exc:  # noqa: BLE001 - overload, replica loss: the same for every request
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            start = 0
            for p in group:
                end = start + len(p.texts)
                if not p.future.done():
                    p.future.set_result(result.rows(start, end))
                start = end
        finally:
            lane.in_flight -= 1
            self._drain(key, lane)

    async def _deliver(self, key: Hashable, pending: _Pending) -> None:
        try:
            result = await self._send(key, pending.texts)
        except Exception as exc:  # noqa: BLE001 - handed to its caller
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(result)
