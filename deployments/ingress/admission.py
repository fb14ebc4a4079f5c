"""Admission of HTTP requests at the ingress: a bounded number at work, a bounded number waiting, the
rest refused at once.

The router does this itself rather than leaving it to Serve's ``max_ongoing_requests`` and
``max_queued_requests``: Serve refuses with a plain-text body ("Request dropped due to backpressure")
that no client can parse as an OpenAI error, and Serve's limits are set above these (see
``serve_options.router_options``) so that the service's own JSON 503 is the answer an overloaded
service gives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


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

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Holds a place for the body of the ``async with``, or refuses at once when all are taken."""
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
