"""The router's coalescer: concurrent requests merge, light load waits for nothing, failures stay alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.coalescer import Coalescer
from deployments.embed_options import EmbedResult
from deployments.errors import ClientError, ModelError


class Downstream:
    """A stand-in model deployment: vectors encode the text, a text 'bad' is refused as a client mistake,
    a text 'nan' fails its call as a model failing on an input would, a text 'overload' as an overloaded
    model would."""

    def __init__(self, delay: float = 0.01):
        self.calls: list[list[str]] = []
        self.delay = delay

    async def __call__(self, key, texts):
        self.calls.append(list(texts))
        await asyncio.sleep(self.delay)
        if "bad" in texts:
            raise ClientError("bad input")
        if "overload" in texts:
            raise RuntimeError("overloaded")
        if "nan" in texts:
            raise ModelError("the model produced non-finite values")
        vectors = np.array([[len(t), hash(key) % 7] for t in texts], dtype=np.float32)
        return EmbedResult(vectors, np.array([len(t) for t in texts], dtype=np.int32), 0.5, 0.25)


def test_concurrent_requests_merge_and_results_keep_their_order():
    async def main():
        down = Downstream()
        co = Coalescer(down, max_in_flight=2)
        texts = ["x" * i for i in range(1, 41)]
        results = await asyncio.gather(*(co.submit("k", [t]) for t in texts))
        return down, results

    down, results = asyncio.run(main())
    assert len(down.calls) <= 4  # 2 sent at once, then the queue leaves together
    assert sum(len(c) for c in down.calls) == 40
    for i, result in enumerate(results, start=1):
        assert (
            result.vectors.shape == (1, 2)
            and result.vectors[0, 0] == i
            and result.token_counts.tolist() == [i]
        )
        assert (result.queue_seconds, result.compute_seconds) == (0.5, 0.25)  # the merged call's timings


def test_a_lone_request_is_sent_at_once():
    async def main():
        down = Downstream(delay=0)
        co = Coalescer(down, max_in_flight=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await co.submit("k", ["a"])
        return loop.time() - t0, down

    elapsed, down = asyncio.run(main())
    assert down.calls == [["a"]] and elapsed < 0.05


def test_keys_never_mix_and_the_call_size_is_capped():
    async def main():
        down = Downstream()
        co = Coalescer(down, max_in_flight=1, max_inputs_per_call=3)
        await asyncio.gather(*(co.submit(k, ["t"]) for k in ("a", "b") for _ in range(8)))
        return down

    down = asyncio.run(main())
    assert all(len(c) <= 3 for c in down.calls)
    assert sum(len(c) for c in down.calls) == 16


def merged_group(texts: tuple[str, ...]) -> tuple[Downstream, list]:
    """A call in flight ("warm"), then one request per text queued behind it: they leave merged."""

    async def main():
        down = Downstream()
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit("k", ["warm"]))
        await asyncio.sleep(0)
        rest = [co.submit("k", [t]) for t in texts]
        return down, await asyncio.gather(first, *rest, return_exceptions=True)

    return asyncio.run(main())


def test_one_failing_request_fails_alone():
    _, results = merged_group(("ok1", "bad", "ok2"))
    assert isinstance(results[2], ClientError)
    assert all(isinstance(r, EmbedResult) for i, r in enumerate(results) if i != 2)


def test_a_model_fault_on_one_input_fails_only_its_request():
    _, results = merged_group(("ok1", "nan", "ok2"))
    assert isinstance(results[2], ModelError)
    assert all(isinstance(r, EmbedResult) for i, r in enumerate(results) if i != 2)


def test_any_other_failure_goes_to_the_whole_group_without_resending():
    down, results = merged_group(("ok1", "overload", "ok2"))
    assert isinstance(results[0], EmbedResult)
    assert all(isinstance(r, RuntimeError) and str(r) == "overloaded" for r in results[1:])
    assert down.calls == [["warm"], ["ok1", "overload", "ok2"]]  # one merged call, not one per request


def test_a_caller_that_gives_up_does_not_block_the_others():
    async def main():
        down = Downstream(delay=0.05)
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit("k", ["a"]))
        await asyncio.sleep(0)
        quitter = asyncio.ensure_future(co.submit("k", ["b"]))
        stayer = asyncio.ensure_future(co.submit("k", ["c"]))
        await asyncio.sleep(0.01)
        quitter.cancel()
        return await asyncio.gather(first, stayer)

    first, stayer = asyncio.run(main())
    assert stayer.vectors[0, 0] == 1


@pytest.mark.parametrize("in_flight", [1, 3])
def test_no_request_is_lost_under_load(in_flight):
    async def main():
        down = Downstream(delay=0.001)
        co = Coalescer(down, max_in_flight=in_flight)
        return await asyncio.gather(*(co.submit(i % 3, ["t"] * (i % 4 + 1)) for i in range(200)))

    results = asyncio.run(main())
    assert [len(r.vectors) for r in results] == [i % 4 + 1 for i in range(200)]


class CancellableDownstream(Downstream):
    """Records which calls were cancelled while in flight."""

    def __init__(self, delay: float):
        super().__init__(delay)
        self.cancelled: list[list[str]] = []

    async def __call__(self, key, texts):
        try:
            return await super().__call__(key, texts)
        except asyncio.CancelledError:
            self.cancelled.append(list(texts))
            raise


def test_a_merged_call_runs_on_for_the_callers_still_waiting():
    async def main():
        down = CancellableDownstream(delay=0.2)
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit("k", ["a"]))
        await asyncio.sleep(0)
        leaver = asyncio.ensure_future(co.submit("k", ["bb"]))
        stayer = asyncio.ensure_future(co.submit("k", ["ccc"]))
        await asyncio.sleep(0.25)  # the first call is done; "bb" and "ccc" now travel merged
        assert down.calls[-1] == ["bb", "ccc"]
        leaver.cancel()
        return down, await stayer, await first

    down, result, _ = asyncio.run(main())
    assert down.cancelled == [] and result.vectors[0, 0] == 3


def test_a_merged_call_is_cancelled_when_all_its_callers_left():
    async def main():
        down = CancellableDownstream(delay=0.2)
        co = Coalescer(down, max_in_flight=1)
        first = asyncio.ensure_future(co.submit("k", ["a"]))
        await asyncio.sleep(0)
        group = [asyncio.ensure_future(co.submit("k", [t])) for t in ("bb", "ccc")]
        await asyncio.sleep(0.25)
        for task in group:
            task.cancel()
        await asyncio.sleep(0.01)
        after = await co.submit("k", ["dddd"])  # the lane is free again
        return down, co, await first, after

    down, co, _, after = asyncio.run(main())
    assert down.cancelled == [["bb", "ccc"]] and co.calls_cancelled == 1
    assert after.vectors[0, 0] == 4


def test_a_lone_call_is_cancelled_with_its_caller():
    async def main():
        down = CancellableDownstream(delay=0.5)
        co = Coalescer(down, max_in_flight=2)
        task = asyncio.ensure_future(co.submit("k", ["a"]))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.01)
        return down

    assert asyncio.run(main()).cancelled == [["a"]]


def test_a_bulk_request_does_not_hold_a_slot_small_requests_need():
    async def main():
        down = Downstream(delay=0.5)
        co = Coalescer(down, max_in_flight=1, direct_min_inputs=64)
        loop = asyncio.get_running_loop()
        bulk = asyncio.ensure_future(co.submit("k", ["x"] * 64))
        await asyncio.sleep(0)
        t0 = loop.time()
        await co.submit("k", ["small"])
        small_s = loop.time() - t0
        await bulk
        return small_s, down

    small_s, down = asyncio.run(main())
    assert small_s < 0.9  # sent at once beside the bulk call, not after it (0.5 s each)
    assert sorted(len(c) for c in down.calls) == [1, 64]
