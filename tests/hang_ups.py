"""Callers that hang up mid-request, at a moment set by the server's state rather than by a clock.

A fixed client timeout hangs up before the work reaches the replica on a slow machine and after it is
done on a fast one; hanging up once the replica has admitted the inputs tests the drop on any machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp


def storm_then_hang_up(url: str, bodies: list[dict], ready: Callable[[], bool], timeout_s: float = 60) -> int:
    """POST every body at once; once ``ready()`` (polled off the loop) is true, every caller still waiting
    hangs up (aiohttp closes the connection of a cancelled request). Returns how many hung up."""

    async def main() -> int:
        connector = aiohttp.TCPConnector(limit=len(bodies) + 8)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(body: dict) -> None:
                async with session.post(url, json=body) as resp:
                    await resp.read()

            calls = [asyncio.create_task(one(body)) for body in bodies]
            deadline = time.monotonic() + timeout_s
            while not await asyncio.to_thread(ready):
                assert time.monotonic() < deadline, "the server never reached the state to hang up at"
                await asyncio.sleep(0.02)
            waiting = [call for call in calls if not call.done()]
            for call in waiting:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            return len(waiting)

    return asyncio.run(main())
