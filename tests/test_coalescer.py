"""The router's coalescer: concurrent requests merge, light load waits for nothing, failures stay alone."""

from __future__ import annotations

import asyncio
import zlib

import numpy as np
import pytest

from deployments.ingress.coalescer import Coalescer
from deployments.protocol.errors import ClientError, ModelError
from deployments.protocol.options import EmbedOptions, EmbedRequest, EmbedResult


def request(*texts: str, normalize: bool = True) -> EmbedRequest:
    return EmbedRequest(list(texts), EmbedOptions(normalize=normalize))


def code(text: str) -> float:
    """A number that differs between texts, so a row handed to the wrong request shows."""
    return float(zlib.crc32(text.encode()) % 100_003)


class Downstream:
    """A stand-in model deployment answering each request of a call on its own, as ``ModelServer`` does:
    a vector per text ``[code(text), normalize]``; a text 'bad' is refused as a client mistake and 'nan'
    fails as a model failing on an input would (each naming its index in its own request); a text
    'overload' fails the whole call, as an overloaded model would."""

    def __init__(self, delay: float = 0.01):
        self.calls: list[list[list[str]]] = []  # per call, the texts of each request
        self.delay = delay

    async def __call__(self, requests: list[EmbedRequest]):
        self.calls.append([list(r.texts) for r in requests])
        await asyncio.sleep(self.delay)
        if any("overload" in r.texts for r in requests):
            raise RuntimeError("overloaded")
        return [self.answer(r) for r in requests]

    @staticmethod
    def answer(r: EmbedRequest):
        if "bad" in r.texts:
            return ClientError("bad input", "invalid_request", "input", index=r.texts.index("bad"))
        if "nan" in r.texts:
            return ModelError("the model produced non-finite values", index=r.texts.index("nan"))
        vectors = np.array([[code(t), float(r.options.normalize)] for t in r.texts], dtype=np.float32)
        tokens = np.array([len(t) for t in r.texts], dtype=np.int32)
        return EmbedResult(vectors, tokens, 0.5, 0.25)


def test_concurrent_requests_merge_and_each_keeps_its_own_rows_and_options():
    async def main():
        down = Downstream()
        co = Coalescer(down, max_in_flight=2)
        requests = [request(f"text {i}", f"and {i * 7}", normalize=i % 2 == 0) for i in range(40)]
        return down, requests, await asyncio.gather(*(co.submit(r) for r in requests))

    down, requests, results = asyncio.run(main())
    assert len(down.calls) <= 4  # 2 sent at once, then the queue leaves together, options mixed
    assert sum(len(c) for c in down.calls) == 40
    for r, result in zip(requests, results, strict=True):
        expected = [[code(t), float(r.options.normalize)] for t in r.texts]
        assert result.vectors.tolist() == expected
        assert result.token_counts.tolist() == [len(t) for t in r.texts]
        assert (result.queue_seconds, result.compute_seconds) == (0.5, 0.25)  # its own timings


def test_a_lone_request_is_sent_at_once():
    """Sent in the submitting task's first step: nothing waits for company."""

    async def main():
        down = Downstream(delay=0.05)
        co = Coalescer(down, max_in_flight=1)
        task = asyncio.ensure_future(co.submit(request("a")))
        await asyncio.sleep(0)  # one turn of the loop: the submit has run up to the downstream's await
        sent = list(down.calls)
        await task
        return sent

    assert asyncio.run(main()) == [[["a"]]]


def test_the_call_size_is_capped():
    async def main():
        down = Downstream()
        co = Coalescer(down, max_in_flight=1, max_inputs_per_call=3)
        await asyncio.gather(*(co.submit(request(f"t{i}")) for i in range(16)))
        return down

    down = asyncio.run(main())
    assert all(len(c) <= 3 for c in down.calls)
    assert sum(len(c) for c in down.calls) == 16


def merged_group(*requests: EmbedRequest) -> tuple[Downstream, list]:
    """A call in flight ("warm"), then the requests queued behind it: they leave merged."""

    async def main():
        down = Downstream()
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit(request("warm")))
        await asyncio.sleep(0)
        rest = [co.submit(r) for r in requests]
        return down, await asyncio.gather(first, *rest, return_exceptions=True)

    return asyncio.run(main())


@pytest.mark.parametrize(("poison", "error"), [("bad", ClientError), ("nan", ModelError)])
def test_one_failing_request_fails_alone_and_nothing_is_sent_twice(poison, error):
    down, results = merged_group(request("ok1", "ok one"), request("fine", poison), request("ok2"))
    assert isinstance(results[2], error) and results[2].index == 1
    assert results[2].message.startswith("input[1]: ")
    assert results[1].vectors.tolist() == [[code("ok1"), 1.0], [code("ok one"), 1.0]]
    assert results[3].vectors.tolist() == [[code("ok2"), 1.0]]
    assert down.calls == [[["warm"]], [["ok1", "ok one"], ["fine", poison], ["ok2"]]]


def test_any_other_failure_goes_to_the_whole_group_without_resending():
    down, results = merged_group(request("ok1"), request("overload"), request("ok2"))
    assert isinstance(results[0], EmbedResult)
    assert all(isinstance(r, RuntimeError) and str(r) == "overloaded" for r in results[1:])
    assert down.calls == [[["warm"]], [["ok1"], ["overload"], ["ok2"]]]  # one merged call, not one each


def test_a_caller_that_gives_up_does_not_block_the_others():
    async def main():
        down = Downstream(delay=0.05)
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit(request("a")))
        await asyncio.sleep(0)
        quitter = asyncio.ensure_future(co.submit(request("b")))
        stayer = asyncio.ensure_future(co.submit(request("c")))
        await asyncio.sleep(0.01)
        quitter.cancel()
        return await asyncio.gather(first, stayer)

    first, stayer = asyncio.run(main())
    assert stayer.vectors[0, 0] == code("c")


@pytest.mark.parametrize("in_flight", [1, 3])
def test_no_request_is_lost_under_load(in_flight):
    async def main():
        down = Downstream(delay=0.001)
        co = Coalescer(down, max_in_flight=in_flight)
        requests = [
            request(*(f"r{i}t{j}" for j in range(i % 4 + 1)), normalize=i % 3 == 0) for i in range(200)
        ]
        return requests, await asyncio.gather(*(co.submit(r) for r in requests))

    requests, results = asyncio.run(main())
    for r, result in zip(requests, results, strict=True):
        assert result.vectors.tolist() == [[code(t), float(r.options.normalize)] for t in r.texts]


class CancellableDownstream(Downstream):
    """Records which calls were cancelled while in flight."""

    def __init__(self, delay: float):
        super().__init__(delay)
        self.cancelled: list[list[str]] = []

    async def __call__(self, requests):
        try:
            return await super().__call__(requests)
        except asyncio.CancelledError:
            self.cancelled.append([t for r in requests for t in r.texts])
            raise


def test_a_merged_call_runs_on_for_the_callers_still_waiting():
    async def main():
        down = CancellableDownstream(delay=0.2)
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit(request("a")))
        await asyncio.sleep(0)
        leaver = asyncio.ensure_future(co.submit(request("bb")))
        stayer = asyncio.ensure_future(co.submit(request("ccc")))
        await asyncio.sleep(0.25)  # the first call is done; "bb" and "ccc" now travel merged
        assert down.calls[-1] == [["bb"], ["ccc"]]
        leaver.cancel()
        return down, await stayer, await first

    down, result, _ = asyncio.run(main())
    assert down.cancelled == [] and result.vectors[0, 0] == code("ccc")


def test_a_merged_call_is_cancelled_when_all_its_callers_left():
    async def main():
        down = CancellableDownstream(delay=0.2)
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit(request("a")))
        await asyncio.sleep(0)
        group = [asyncio.ensure_future(co.submit(request(t))) for t in ("bb", "ccc")]
        await asyncio.sleep(0.25)
        for task in group:
            task.cancel()
        await asyncio.sleep(0.01)
        after = await co.submit(request("dddd"))  # the slot is free again
        return down, co, await first, after

    down, co, _, after = asyncio.run(main())
    assert down.cancelled == [["bb", "ccc"]] and co.calls_cancelled == 1
    assert after.vectors[0, 0] == code("dddd")


def test_a_lone_call_is_cancelled_with_its_caller():
    async def main():
        down = CancellableDownstream(delay=0.5)
        co = Coalescer(down, max_in_flight=2)
        task = asyncio.ensure_future(co.submit(request("a")))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.01)
        return down

    assert asyncio.run(main()).cancelled == [["a"]]


def test_a_bulk_request_does_not_hold_a_slot_small_requests_need():
    async def main():
        down = Downstream(delay=0.5)
        co = Coalescer(down, max_in_flight=1, direct_min_inputs=64)
        bulk = asyncio.ensure_future(co.submit(request(*(f"x{i}" for i in range(64)))))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(co.submit(request("small")))
        await asyncio.sleep(0)
        sent_beside_the_bulk = [len(c[0]) for c in down.calls]  # the bulk call has not returned yet
        await asyncio.gather(bulk, small)
        return sent_beside_the_bulk

    sent = asyncio.run(main())
    assert sent == [64, 1]  # the small one went at once, while the bulk call was in flight
