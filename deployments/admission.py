"""Admission of HTTP requests at the ingress: a bounded number at work, a bounded number waiting, the
rest refused at once.

The router does this itself rather than leaving it to Serve's ``max_ongoing_requests`` and
``max_queued_requests``: Serve refuses with a plain-text body ("Request dropped due to backpressure")
that no client can parse as an OpenAI error, and Serve's limits are set above these (see
``config.router_options``) so that the service's own JSON 503 is the answer an overloaded service gives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Overloaded(Exception):
    """Every slot is taken and the waiting line is full."""


class Admission:
    """At most ``ongoing`` requests at work and ``queued`` more waiting for a slot (first come, first
    served); the next one is refused with ``Overloaded`` without waiting."""

    def __init__(self, ongoing: int, queued: int):
        self.ongoing = ongoing
        self.queued = queued
        self._slots = asyncio.Semaphore(ongoing)
        self.waiting = 0
        self.at_work = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Holds a slot for the body of the ``async with``; yields the seconds spent waiting for it."""
        start = time.monotonic()
        if self._slots.locked():  # no free slot, or others already waiting for one
            if self.waiting >= self.queued:
                raise Overloaded
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
