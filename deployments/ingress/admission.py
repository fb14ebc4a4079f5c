"""Admission of HTTP requests at the ingress: a bounded number at work, a bounded number waiting, the
rest refused at once.

The router does this itself rather than leaving it to Serve's ``max_ongoing_requests`` and
``max_queued_requests``: Serve refuses with a plain-text body ("Request dropped due to backpressure")
that no client can parse as an OpenAI error, and Serve's limits are set above these (see
``serve_options.router_options``) so that the service's own JSON 503 is the answer an overloaded
service gives.

Before the service stops (``deployments/tools/serve_run.py``), ``drain`` closes admission: new requests get
a 503 ``shutting_down`` while those already in, and handle calls, are answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from deployments.protocol.errors import ShuttingDown


class Overloaded(Exception):
    """Every slot is taken and the waiting line is full."""


class Admission:
    """At most ``ongoing + queued`` requests in the router at once (each holds a ``place`` from arrival to
    answer), ``ongoing`` of them at work (a ``slot``, taken first come, first served once the body is in);
    the others are still sending their body or wait for a slot. The next one is refused with
    ``Overloaded`` without waiting. A slow sender holds a place, never a slot: it delays nobody's work."""

    def __init__(self, ongoing: int, queued: int):
        self.ongoing = ongoing
        self.queued = queued
        self._slots = asyncio.Semaphore(ongoing)
        self.inside = 0  # requests holding a place
        self.waiting = 0  # of them, waiting for a slot
        self.at_work = 0  # of them, holding a slot
        self.calls = 0  # handle calls (in-cluster callers) being answered; they take no place
        self.draining = False  # set once by ``drain``: every new request and call is refused

    def check_open(self) -> None:
        """Raises ``ShuttingDown`` once the replica drains."""
        if self.draining:
            raise ShuttingDown("the service is shutting down: this request was not started; send it again")

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Holds a place for the body of the ``async with``, or refuses at once when all are taken."""
        self.check_open()
        if self.inside >= self.ongoing + self.queued:
            raise Overloaded
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Holds a slot of work (inside a ``place``, which bounds the line); yields the seconds spent
        waiting for it."""
        start = time.monotonic()
        if self._slots.locked():  # no free slot, or others already waiting for one
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()  # free: returns without yielding to the loop
        self.at_work += 1
        try:
            yield time.monotonic() - start
        finally:
            self.at_work -= 1
            self._slots.release()

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Counts a handle call for ``drain`` (no limit: Serve's own queue bounds those)."""
        self.check_open()
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1

    async def drain(self, timeout_s: float, poll_s: float = 0.05) -> int:
        """Refuses every new request and call from now on, for good (the service is stopping), and waits,
        at most ``timeout_s``, for those already in to be answered; how many were still in when it
        stopped waiting."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.inside + self.calls and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.inside + self.calls
