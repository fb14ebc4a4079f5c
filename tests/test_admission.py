"""The router's admission: a bounded number at work, a bounded line waiting in order, the rest refused."""

from __future__ import annotations

import asyncio

import pytest

from deployments.ingress.admission import Admission, Overloaded
from deployments.protocol.errors import ShuttingDown


async def _hold(admission: Admission, name: str, release: asyncio.Event, log: list[str]) -> float:
    async with admission.place(), admission.slot() as waited_s:
        log.append(name)
        await release.wait()
        return waited_s


def test_at_work_then_waiting_in_order_then_refused_at_once():
    async def scenario():
        admission = Admission(ongoing=2, queued=2)
        release, log = asyncio.Event(), []
        holders = [asyncio.create_task(_hold(admission, f"r{i}", release, log)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert log == ["r0", "r1"] and admission.at_work == 2 and admission.waiting == 2
        with pytest.raises(Overloaded):  # the fifth: no slot, the line full
            async with admission.place():
                raise AssertionError("admitted past the limits")
        assert admission.waiting == 2 and admission.inside == 4  # a refusal takes nothing
        release.set()
        waits = await asyncio.gather(*holders)
        assert log == ["r0", "r1", "r2", "r3"]  # first come, first served
        # r0 never waited (no await on a free slot: its wait is the bookkeeping's, far under the 10 ms
        # sleep that r2 sat out in line); bounds on wall time that a busy 2-core machine cannot break
        assert waits[0] < 0.1 and waits[2] >= 0.01 and waits[0] < waits[2]
        assert admission.at_work == 0 and admission.waiting == 0 and admission.inside == 0
        async with admission.place(), admission.slot():  # free again
            assert admission.at_work == 1

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_leaves_the_line_and_frees_its_place():
    async def scenario():
        admission = Admission(ongoing=1, queued=1)
        release, log = asyncio.Event(), []
        holder = asyncio.create_task(_hold(admission, "held", release, log))
        waiter = asyncio.create_task(_hold(admission, "gone", release, log))
        await asyncio.sleep(0.01)
        waiter.cancel()  # its caller left while it waited
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.waiting == 0
        later = asyncio.create_task(_hold(admission, "later", release, log))  # takes the freed place
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(holder, later)
        assert log == ["held", "later"] and admission.at_work == 0

    asyncio.run(scenario())


def test_an_error_at_work_gives_the_slot_back():
    async def scenario():
        admission = Admission(ongoing=1, queued=0)
        with pytest.raises(RuntimeError):
            async with admission.place(), admission.slot():
                raise RuntimeError("the request failed")
        async with admission.place(), admission.slot() as waited_s:
            assert waited_s < 0.1 and admission.inside == 1 and admission.waiting == 0

    asyncio.run(scenario())


def test_a_request_still_sending_its_body_holds_a_place_but_no_slot():
    async def scenario():
        admission = Admission(ongoing=1, queued=2)
        body_in = asyncio.Event()

        async def slow_sender() -> None:
            async with admission.place():
                await body_in.wait()  # its body is still arriving

        senders = [asyncio.create_task(slow_sender()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert admission.inside == 2 and admission.at_work == 0
        async with admission.place(), admission.slot() as waited_s:  # the one slot is free for work
            assert waited_s < 0.1 and admission.inside == 3 and admission.waiting == 0
            with pytest.raises(Overloaded):  # every place taken: refused before its body is read
                async with admission.place():
                    raise AssertionError("admitted past the limits")
        body_in.set()
        await asyncio.gather(*senders)
        assert admission.inside == 0

    asyncio.run(scenario())


def test_a_drain_refuses_newcomers_and_waits_for_what_is_in():
    async def scenario():
        admission = Admission(ongoing=2, queued=2)
        release, log = asyncio.Event(), []
        held = asyncio.create_task(_hold(admission, "in", release, log))

        async def handle_call() -> None:
            async with admission.call():
                await release.wait()

        call = asyncio.create_task(handle_call())
        await asyncio.sleep(0.01)
        draining = asyncio.create_task(admission.drain(timeout_s=5, poll_s=0.005))
        await asyncio.sleep(0.02)
        assert not draining.done()  # a request and a handle call are still in
        for newcomer in (admission.place(), admission.call()):
            with pytest.raises(ShuttingDown, match="shutting down"):
                async with newcomer:
                    raise AssertionError("admitted while draining")
        release.set()
        assert await draining == 0 and log == ["in"]
        await asyncio.gather(held, call)
        assert admission.inside == admission.calls == 0

    asyncio.run(scenario())


def test_a_drain_stops_waiting_at_its_bound_and_says_how_many_were_left():
    async def scenario():
        admission = Admission(ongoing=2, queued=2)
        release = asyncio.Event()
        held = [asyncio.create_task(_hold(admission, f"r{i}", release, [])) for i in range(3)]
        await asyncio.sleep(0.01)
        assert await admission.drain(timeout_s=0.05, poll_s=0.005) == 3  # two at work, one waiting
        release.set()
        await asyncio.gather(*held)

    asyncio.run(scenario())
