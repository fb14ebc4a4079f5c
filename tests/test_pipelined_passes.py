"""No idle device between passes, tested on CPU: the real MiniLM behind a backend whose passes run on a
"device" queue of their own (one worker thread running passes in launch order, as a CUDA stream does), so
``launch`` returns before the pass is done, as it does on CUDA. The scheduler must launch pass N+1 before it
reads pass N back, give the same vectors as the synchronous path, keep failures to their own rows, and plan
without holding the lock that callers need to be admitted."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from benchmarks.common import kt_gen_mix, short_mix
from deployments.config import Batching
from deployments.engine import scheduler as scheduler_module
from deployments.engine.backends.base import EncodedText
from deployments.engine.backends.fidelity import worst_cosine
from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend
from deployments.engine.device_faults import DeviceFault
from deployments.engine.embedding_engine import EmbeddingEngine
from deployments.engine.launch_timing import LEAD_SHARE, LaunchTiming
from deployments.engine.scheduler import Scheduler
from deployments.protocol.errors import ModelError
from deployments.protocol.options import EmbedOptions, EmbedRequest
from tests.conftest import MINILM_DIR
from tests.fatal_module import POISONED_CONTEXT

OPTIONS = EmbedOptions(prompt="", normalize=True, truncate=True)
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB"
BATCHING = Batching(max_batch_tokens=512, max_batch_size=32, forward_overhead_tokens=16)


class QueuedPass:
    def __init__(self, future: Future, number: int, log: list[tuple[str, int]], lock: threading.Lock):
        self.future, self.number, self.log, self.lock = future, number, log, lock

    def result(self) -> np.ndarray:
        with self.lock:
            self.log.append(("read", self.number))
        return self.future.result()[0]  # raises what the pass raised, as CUDA reports at synchronisation

    def done(self) -> bool:
        return self.future.done()

    def device_seconds(self) -> float | None:
        return self.future.result()[1]  # the "device's" own time for the pass, as a CUDA event gives it


class QueuedDeviceBackend(SentenceTransformersBackend):
    """MiniLM whose passes run on a one-thread queue in launch order; ``fail_on`` makes a pass holding that
    text raise ``error`` when it runs (so at read-back, as an asynchronous device reports it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asynchronous = True  # launch returns before the pass is done, as on CUDA
        self.queue = ThreadPoolExecutor(1, thread_name_prefix="device")
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.launches = 0
        self.fail_on: dict[int, Exception] = {}  # first token id after [CLS] -> what a pass holding it raises
        self.limit: int | None = None  # padded tokens a pass may hold: more runs out of "device memory"
        # Added to each queued pass per padded token (and 16 for the pass: BATCHING's overhead), so passes
        # take as long as a 7B model's on a GPU and grow with their tokens as the planner's cost model says.
        self.seconds_per_token = 0.0
        self.holding: dict[int, set[int]] = {}  # pass number -> first token ids of its inputs

    def out_of_memory(self, items: list[EncodedText], where: str) -> None:
        if self.limit is not None and len(items) * max(it.length for it in items) > self.limit:
            with self.lock:
                self.log.append((where, -1))
            raise torch.OutOfMemoryError(CUDA_OOM)

    def launch(self, items: list[EncodedText]) -> QueuedPass:
        self.out_of_memory(items, "out of memory at launch")  # allocating happens as kernels are queued
        with self.lock:
            number = self.launches
            self.launches += 1
            self.log.append(("launch", number))
            self.holding[number] = {int(it.features["input_ids"][1]) for it in items}
        return QueuedPass(self.queue.submit(self._run, items, number), number, self.log, self.lock)

    def _run(self, items: list[EncodedText], number: int) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        with self.lock:
            self.log.append(("start", number))
        padded = len(items) * max(it.length for it in items)
        time.sleep(self.seconds_per_token * (padded + BATCHING.forward_overhead_tokens))
        vectors = self.forward(items)
        with self.lock:
            self.log.append(("end", number))
        return vectors, time.perf_counter() - started

    def forward(self, items: list[EncodedText]) -> np.ndarray:
        """A pass to the end (the scheduler's re-runs after a failure use it), failing as the device would."""
        self.out_of_memory(items, "out of memory")
        with self.lock:
            self.log.append(("forward", -1))
        for item in items:
            error = self.fail_on.get(int(item.features["input_ids"][1]))
            if error is not None:
                raise error
        return super().forward(items)


@pytest.fixture(scope="module")
def device_backend() -> QueuedDeviceBackend:
    return QueuedDeviceBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=128)


def first_token(backend: SentenceTransformersBackend, text: str) -> int:
    return int(backend.tokenize([text], "")[0].features["input_ids"][1])


def test_the_next_pass_is_launched_before_the_current_one_is_read_back(device_backend, minilm):
    device_backend.log.clear()
    engine = EmbeddingEngine(device_backend, BATCHING)
    bulk, names = kt_gen_mix(200, seed=11), short_mix(30, seed=12)
    results = engine.run(
        [EmbedRequest(bulk, OPTIONS), EmbedRequest(names, OPTIONS), EmbedRequest(["Ada"], OPTIONS)]
    )
    assert worst_cosine(results[0].vectors, minilm.encode(bulk)) >= 0.99999
    assert worst_cosine(results[1].vectors, minilm.encode(names)) >= 0.99999
    assert worst_cosine(results[2].vectors, minilm.encode(["Ada"])) >= 0.99999
    log = device_backend.log
    log = [event for event in log if event[0] in ("launch", "read")]
    launched = [n for kind, n in log if kind == "launch"]
    read = [n for kind, n in log if kind == "read"]
    assert len(launched) > 10 and sorted(read) == launched  # every pass launched is read back once
    where = {event: i for i, event in enumerate(log)}
    for n in launched[:-1]:  # pass n+1 was on the device's queue before pass n was read back
        assert where[("launch", n + 1)] < where[("read", n)], (n, log[: where[("read", n)] + 2])
    stats = engine.stats()
    assert stats["forward_passes"] == len(launched) and stats["answered_calls"] == 3


def test_a_pass_that_fails_on_the_device_fails_only_its_rows(device_backend, minilm):
    """The failure shows when the pass is read back, with the next pass already queued behind it: the
    failing pass runs again row by row, the input is refused by name, every other input is answered."""
    bad_text = "Qwertyuiop archipelago"
    bulk = kt_gen_mix(120, seed=13)
    bad = first_token(device_backend, bad_text)
    assert all(first_token(device_backend, t) != bad for t in bulk)
    device_backend.fail_on = {bad: RuntimeError("kernel rejected a row")}
    try:
        engine = EmbeddingEngine(device_backend, BATCHING)
        mixed = ["Marie Curie", bad_text, "Pierre Curie"]
        results = engine.run([EmbedRequest(bulk, OPTIONS), EmbedRequest(mixed, OPTIONS)])
    finally:
        device_backend.fail_on = {}
    assert worst_cosine(results[0].vectors, minilm.encode(bulk)) >= 0.99999
    refused = results[1]
    assert isinstance(refused, ModelError) and refused.index == 1 and "kernel rejected a row" in str(refused)


def test_a_poisoned_context_seen_at_read_back_fails_the_pass_queued_behind_it_too(minilm):
    backend = QueuedDeviceBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=128)
    bulk = kt_gen_mix(200, seed=14)
    poison = first_token(backend, "Qwertyuiop")
    assert all(first_token(backend, t) != poison for t in bulk)
    backend.fail_on = {poison: torch.AcceleratorError(POISONED_CONTEXT)}
    engine = EmbeddingEngine(backend, BATCHING)
    results = engine.run([EmbedRequest(["Qwertyuiop"], OPTIONS), EmbedRequest(bulk, OPTIONS)])
    assert all(isinstance(r, DeviceFault) for r in results)
    with pytest.raises(DeviceFault):
        engine.health()
    launched = [n for kind, n in backend.log if kind == "launch"]
    assert len(launched) == 2  # the failed pass and the one queued behind it; nothing after


def test_callers_are_admitted_while_the_planner_works(monkeypatch):
    """The planner runs outside the scheduler's lock: a call admitted while a plan is being made is
    admitted at once (it waited for the whole plan before), and joins the plan that follows."""
    backend = QueuedDeviceBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=128)
    scheduler = Scheduler(backend, BATCHING)
    planning, admitted = threading.Event(), threading.Event()
    real_plan = scheduler_module.plan_micro_batches

    def slow_plan(*args, **kwargs):
        planning.set()
        admitted.wait(10)  # the planner is held until the other caller got in (or 10 s: the test fails)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "plan_micro_batches", slow_plan)
    answers: list = []
    first = backend.tokenize(kt_gen_mix(20, seed=15), "")
    scheduler.admit(first, True, answers.append)
    stepping = threading.Thread(target=lambda: [None for _ in iter(scheduler.step, False)])
    stepping.start()
    assert planning.wait(10)
    late = backend.tokenize(["Ada Lovelace"], "")
    done = threading.Event()
    threading.Thread(target=lambda: (scheduler.admit(late, True, answers.append), done.set())).start()
    assert done.wait(5), "admit waited for the planner"
    admitted.set()
    stepping.join(30)
    assert not stepping.is_alive() and len(answers) == 2
    assert all(not isinstance(a, Exception) for a in answers)


def test_a_pass_out_of_memory_at_launch_is_split_with_nothing_queued_behind_it(minilm):
    """Allocating happens as kernels are queued, so an out-of-memory shows at launch: that pass runs again
    split before anything is launched behind it (its halves get the device to themselves), the vectors are
    ``encode``'s and the budget shrinks."""
    backend = QueuedDeviceBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=128)
    backend.limit = 300
    engine = EmbeddingEngine(backend, BATCHING)
    texts = kt_gen_mix(150, seed=16)
    (result,) = engine.run([EmbedRequest(texts, OPTIONS)])
    assert worst_cosine(result.vectors, minilm.encode(texts)) >= 0.99999
    stats = engine.stats()
    assert stats["out_of_memory_passes"] >= 1 and stats["max_batch_tokens_now"] < BATCHING.max_batch_tokens
    log = backend.log
    failed = [i for i, (kind, _) in enumerate(log) if kind == "out of memory at launch"]
    assert failed
    for i in failed:  # the pass already running is read back, then the split runs: nothing launched between
        after = [kind for kind, _ in log[i + 1 :] if kind not in ("read", "start", "end")]
        assert after[0] in ("forward", "out of memory"), log[i : i + 4]


@pytest.mark.parametrize("just_in_time", [True, False])
def test_a_call_arriving_while_a_pass_runs_joins_the_next_pass(just_in_time: bool):
    """Passes of ~0.3 s (a 7B model's on a GPU): a query admitted early in pass k joins pass k+1, which is
    launched just before k ends, so the device still finds it queued. Launched as k starts (the other
    policy, ``just_in_time=False``), k+1 is fixed before the query comes and the query waits for k+2."""
    backend = QueuedDeviceBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=128)
    backend.seconds_per_token = 0.3 / 528  # a full pass (512 tokens) ~0.3 s
    scheduler = Scheduler(backend, BATCHING, just_in_time=just_in_time)
    # Texts of one length, so every pass is full (32 rows x 16 tokens) and takes ~0.3 s: "early in pass 4"
    # is then early whichever pass 4 is.
    bulk = [f"Document {i} on the long history of science and its many old instruments." for i in range(320)]
    assert {it.length for it in backend.tokenize(bulk, "")} == {16}
    query = backend.tokenize(["Qwertyuiop"], "")
    query_token = int(query[0].features["input_ids"][1])
    assert all(first_token(backend, t) != query_token for t in bulk)
    answers: list = []
    scheduler.admit(backend.tokenize(bulk, ""), True, answers.append)
    stepping = threading.Thread(target=lambda: [None for _ in iter(scheduler.step, False)])
    stepping.start()
    deadline = time.monotonic() + 30
    while ("start", 4) not in backend.log and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # early in pass 4 (the estimate has several passes behind it)
    with backend.lock:
        running = max(n for kind, n in backend.log if kind == "start")
    scheduler.admit(query, True, answers.append)
    stepping.join(60)
    assert not stepping.is_alive() and len(answers) == 2
    assert all(not isinstance(a, Exception) for a in answers)
    (carried,) = [n for n, tokens in backend.holding.items() if query_token in tokens]
    assert carried == running + (1 if just_in_time else 2), (running, carried)
    where = {event: i for i, event in enumerate(backend.log)}
    passes = sorted(n for kind, n in backend.log if kind == "launch")
    assert len(passes) >= 10
    # From bulk pass to bulk pass (the query's pass is shorter than the host's read-back of the one before)
    bulk_to_bulk = [n for n in passes[1:-1] if carried not in (n, n + 1)]
    queued_in_time = [where[("launch", n + 1)] < where[("end", n)] for n in bulk_to_bulk]
    print(f"next pass queued before the running one ended: {sum(queued_in_time)} of {len(queued_in_time)}")
    assert sum(queued_in_time) >= 0.75 * len(queued_in_time), backend.log  # no idle device between passes
    # The scheduler's own record of the same: every launch after the first was behind a running pass, few
    # came after it had ended, and the bulk passes took what the estimate said (they are alike; the query's
    # short pass runs over its estimate: its fixed cost is more than the model's ``forward_overhead_tokens``).
    stats = scheduler.stats()
    assert stats["launches_behind_a_pass"] == len(passes) - 1, stats
    assert stats["launches_after_it_ended"] <= 0.25 * stats["launches_behind_a_pass"], stats
    if just_in_time:
        assert -0.2 < stats["pass_estimate_error_p10"] and abs(stats["pass_estimate_error_p50"]) < 0.1, stats


def test_the_launch_point_is_the_expected_end_less_the_hosts_time_and_a_share_of_the_pass():
    timing = LaunchTiming(overhead_tokens=256)
    assert timing.launch_point(10.0, 16384) is None  # no pass timed yet: launch at once
    timing.observe_pass(16384 - 256, 0.5)  # 0.5 s for 16384 tokens of work
    timing.observe_launch(0.004)
    expected = timing.expected_seconds(16384 - 256)
    assert expected == pytest.approx(0.5)
    lead = 2 * timing.host_launch_s + LEAD_SHARE * 0.5
    assert timing.launch_point(10.0, 16384 - 256) == pytest.approx(10.5 - lead)
    timing.observe_pass(1000, 0.0)  # an untimed pass changes nothing
    assert timing.expected_seconds(16384 - 256) == pytest.approx(0.5)
    timing.observe_pass(8, 0.01)  # a query's pass, slow per token (its fixed cost is more than modelled)
    assert timing.expected_seconds(16384 - 256) == pytest.approx(0.5, rel=0.02)  # weighed by its size
    for _ in range(30):  # the device got twice as slow: the estimate follows within a few passes
        timing.observe_pass(16384 - 256, 1.0)
    assert timing.expected_seconds(16384 - 256) == pytest.approx(1.0, rel=0.01)
