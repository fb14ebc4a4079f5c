"""Clients that misbehave: callers that hang up mid-request, and connections that trickle a body.

Hang-ups happen at a moment set by the server's state rather than by a clock: a fixed client timeout
hangs up before the work reaches the replica on a slow machine and after it is done on a fast one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
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


def settled_stats(stats: Callable[[], dict], quiet_s: float = 0.5, timeout_s: float = 10.0) -> dict:
    """``stats()`` (a replica's counters) once its queue is empty and its count of dropped inputs has not
    moved for ``quiet_s``: the hang-ups have travelled to the replica (a fixed sleep after a storm was too
    short on a loaded 2-core machine, where a pass ran for callers not yet seen leaving)."""
    deadline = time.monotonic() + timeout_s
    last, since = stats(), time.monotonic()
    while True:
        assert time.monotonic() < deadline, f"the hang-ups were not all seen in {timeout_s} s: {last}"
        time.sleep(0.05)
        now = stats()
        if now["dropped_inputs"] != last["dropped_inputs"] or now["queue_inputs"]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now


def open_tricklers(url: str, path: str, count: int) -> list[socket.socket]:
    """``count`` connections that send a POST's headers (Content-Length 100000) and one byte of body."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    slow = [socket.create_connection((host, int(port))) for _ in range(count)]
    for s in slow:
        s.sendall(head + b"Content-Length: 100000\r\n\r\n{")
    return slow


def trickle_while(
    slow: list[socket.socket], request: Callable[[int], None], rounds: int, pause_s: float
) -> list[float]:
    """``rounds`` times: one more byte on every trickling connection, then ``request(i)`` timed.
    Returns the seconds each request took."""
    latencies = []
    for i in range(rounds):
        for s in slow:
            with contextlib.suppress(OSError):
                s.send(b" ")
        t0 = time.perf_counter()
        request(i)
        latencies.append(time.perf_counter() - t0)
        time.sleep(pause_s)
    return latencies


def status_lines(sockets: list[socket.socket], timeout_s: float) -> list[bytes]:
    """The first line each connection was answered with (waiting up to ``timeout_s`` on each)."""
    answers = []
    for s in sockets:
        s.settimeout(timeout_s)
        with contextlib.suppress(OSError):
            answers.append(s.recv(4096).split(b"\r\n", 1)[0])
    return answers
