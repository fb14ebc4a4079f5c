"""Merges concurrent requests for one model into few downstream calls, adding no wait.

Each hop between Ray Serve replicas costs milliseconds of CPU per call, which on a small machine caps
single-text traffic long before the model does. The coalescer sends a request at once while fewer than
``max_in_flight`` calls are outstanding (the router allows two per model replica); otherwise the request
waits for a free slot and leaves together with every request that queued meanwhile. Light load sees no
added latency; heavy load gets large calls.

A merged call carries its requests whole (a list of ``EmbedRequest``, whatever their options) and the
model answers each on its own: its result, or the error about one of its own inputs. So a bad input fails
only its own request and nothing is sent twice. A failure of the whole call (overload, replica loss) goes to
every request in it as it is. Plain asyncio: no Ray here.

Callers that leave (hang up, time out, are cancelled) cost nothing more than what already runs: a queued
request leaves the queue; a request sent on its own cancels its call; a merged call is cancelled when the
last of its callers has left, and runs on for the ones still waiting (the rows of those who left are
computed with them, at most ``max_inputs_per_call`` inputs).

Requests of ``direct_min_inputs`` inputs or more skip the queue: merging gains a request that large
nothing, and it must not hold the slots that small requests merge through while the model (whose
scheduler serves small calls first) works through it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from deployments.protocol.options import EmbedRequest, EmbedResult

# What the model answers for each request of a call: its result, or the error about its own input.
Answer = EmbedResult | Exception
# send(requests) -> one answer per request, in order; raises for a failure of the whole call.
Send = Callable[[list[EmbedRequest]], Awaitable[list[Answer]]]


@dataclass
class _Pending:
    request: EmbedRequest
    future: asyncio.Future


class Coalescer:
    def __init__(
        self,
        send: Send,
        max_in_flight: int | Callable[[], int] = 2,
        max_inputs_per_call: int = 256,
        direct_min_inputs: int = 64,
    ):
        self._send = send
        self._limit = max_in_flight if callable(max_in_flight) else (lambda: max_in_flight)
        self._max_inputs = max_inputs_per_call
        self._direct_min = direct_min_inputs
        self._in_flight = 0
        self._queue: list[_Pending] = []
        self.calls_cancelled = 0  # merged calls cancelled because every caller had left

    async def submit(self, request: EmbedRequest) -> EmbedResult:
        """The request's result; raises its own error, or the whole call's."""
        if len(request.texts) >= self._direct_min:
            return _settled(await self._send_one(request))
        if self._in_flight < self._limit() and not self._queue:
            self._in_flight += 1
            try:
                return _settled(await self._send_one(request))
            finally:
                self._in_flight -= 1
                self._drain()
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, future))
        return await future

    async def _send_one(self, request: EmbedRequest) -> Answer:
        [answer] = await self._send([request])
        return answer

    def _drain(self) -> None:
        """Start one merged call with as much of the queue as fits, if a slot is free."""
        self._queue = [p for p in self._queue if not p.future.done()]  # callers that gave up
        if not self._queue or self._in_flight >= self._limit():
            return
        group, total = [], 0
        while self._queue and (not group or total + len(self._queue[0].request.texts) <= self._max_inputs):
            pending = self._queue.pop(0)
            group.append(pending)
            total += len(pending.request.texts)
        self._in_flight += 1
        # A fresh context: the merged call belongs to no single request, so Ray must not cancel it with
        # the request whose completion happened to start it; it is cancelled when all its callers left.
        task = contextvars.Context().run(asyncio.ensure_future, self._run_group(group))

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

    async def _run_group(self, group: list[_Pending]) -> None:
        try:
            try:
                answers = await self._send([p.request for p in group])
            except Exception as exc:  # noqa: BLE001 - overload, replica loss: the same for every request
                answers = [exc] * len(group)
            for pending, answer in zip(group, answers, strict=True):
                if pending.future.done():
                    continue
                if isinstance(answer, Exception):
                    pending.future.set_exception(answer)
                else:
                    pending.future.set_result(answer)
        finally:
            self._in_flight -= 1
            self._drain()


def _settled(answer: Answer) -> EmbedResult:
    if isinstance(answer, Exception):
        raise answer
    return answer
