"""The engine over the real MiniLM backend: vectors equal sentence-transformers' whatever the grouping,
one failing call never sinks the others in the same batch, a small call is answered during a bulk one,
and a cancelled call's rows are dropped. The scheduler's policy alone, on a counting backend, is
tests/test_scheduler.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from benchmarks.common import kt_gen_mix
from deployments.config import Batching
from deployments.engine.backends.fidelity import worst_cosine
from deployments.engine.backends.registry import load_sentence_transformers
from deployments.engine.backends.sentence_transformers import SentenceTransformersBackend, _features
from deployments.engine.embedding_engine import (
    CHARS_PER_TOKEN_CEILING,
    CHARS_PER_TOKEN_FIRST,
    EmbeddingEngine,
    cut_text,
    tokenize_capped,
)
from deployments.protocol.errors import ClientError
from deployments.protocol.options import EmbedOptions, EmbedRequest
from tests.conftest import MINILM_DIR

TEXTS = [
    "Marie Curie",
    "",
    "a physicist and chemist who conducted pioneering research on radioactivity " * 3,
    "Warsaw",
    "The Nobel Prize in Physics 1903 was awarded jointly to Henri Becquerel, Pierre Curie and Marie Curie",
]


# Every runtime and precision a CPU replica may serve: each must give sentence-transformers' vectors.
CPU_PATHS = [("torch", "float32"), ("torch", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16")]


@pytest.fixture(scope="module", params=CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
def backend(request, minilm_compile_cache):
    runtime, dtype = request.param
    backend = load_sentence_transformers(
        MINILM_DIR,
        max_seq_length=256,
        runtime=runtime,
        dtype=dtype,
        threads=2,
        cache_dir=minilm_compile_cache,
    )
    assert backend.serving.runtime == runtime  # the gate let the fast path through
    return backend


@pytest.mark.parametrize("budget", [16384, 64])
def test_equal_to_sentence_transformers_in_any_grouping(backend, minilm, budget):
    engine = EmbeddingEngine(backend, Batching(max_batch_tokens=budget, max_batch_size=3))
    expected = minilm.encode(TEXTS)
    together = engine.run([EmbedRequest(TEXTS)])[0]
    one_by_one = engine.run([EmbedRequest([t]) for t in TEXTS])
    assert together.vectors.dtype == np.float32 and together.vectors.shape == (5, 384)
    assert worst_cosine(together.vectors, expected) >= 0.9999
    assert worst_cosine(np.concatenate([r.vectors for r in one_by_one]), expected) >= 0.9999
    assert together.token_counts.tolist() == [r.token_counts[0] for r in one_by_one]
    assert together.token_counts[1] == 2  # "" is [CLS] [SEP], as sentence-transformers embeds it


def test_prompts_are_prepended_as_sentence_transformers_does(backend, minilm):
    engine = EmbeddingEngine(backend, Batching())
    got = engine.run([EmbedRequest(TEXTS, EmbedOptions(prompt="query: "))])[0].vectors
    assert worst_cosine(got, minilm.encode(TEXTS, prompt="query: ")) >= 0.9999
    assert worst_cosine(got, minilm.encode(TEXTS)) < 0.999  # the prompt did change something


def test_truncation_and_its_refusal(backend, minilm):
    engine = EmbeddingEngine(backend, Batching())
    long_text = "word " * 400
    ok, refused = engine.run(
        [EmbedRequest([long_text]), EmbedRequest(["fine", long_text], EmbedOptions(truncate=False))]
    )
    assert ok.token_counts.tolist() == [256]
    assert worst_cosine(ok.vectors, minilm.encode([long_text])) >= 0.9999
    assert isinstance(refused, ClientError) and refused.status == 400 and "input[1]" in refused.message


class FlakyBackend(SentenceTransformersBackend):
    """The real backend with an injected fault: any micro-batch holding the word 'poison' fails."""

    def forward(self, items):
        poison = self.model.tokenizer.convert_tokens_to_ids("poison")
        if any(poison in it.features["input_ids"].tolist() for it in items):
            raise RuntimeError("injected fault")
        return super().forward(items)


def test_the_direct_tokenizer_gives_exactly_the_token_ids_of_preprocess(tiny_bge_dir):
    """The model's fast tokenizer called directly (the path chosen at load when it matches) against
    sentence-transformers' preprocess, on 400 kt_gen-like texts, with and without a prompt, truncating
    and not: every input the same ids, mask, type ids and length; an over-long one refused the same."""
    for source in (MINILM_DIR, tiny_bge_dir):
        backend = SentenceTransformersBackend(source, device=torch.device("cpu"), max_seq_length=64)
        assert backend.tokenizer_path == "direct", source
        texts = kt_gen_mix(400, seed=3)
        for prompt in ("", "query: "):
            fast = backend.tokenize(texts, prompt)
            slow = backend._tokenize_preprocess(texts, prompt, 64)
            assert [_features(a) for a in fast] == [_features(b) for b in slow]
            fast = backend.tokenize(texts, prompt, 65)  # what the engine asks when truncate is false
            assert [_features(a) for a in fast] == [
                _features(b) for b in backend._tokenize_preprocess(texts, prompt, 65)
            ]
            assert max(item.length for item in fast) == 65  # some are longer: the engine refuses those
        with pytest.raises(ClientError, match=r"input\[1\]: more than 64 tokens") as refused:
            tokenize_capped(backend, ["fine", "word " * 200], "", truncate=False)
        assert (refused.value.status, refused.value.code) == (400, "input_too_long")


def test_one_failing_input_fails_only_its_call(minilm):
    backend = FlakyBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=256)
    engine = EmbeddingEngine(backend, Batching(max_batch_size=256))
    calls = [EmbedRequest(["alpha", "beta"]), EmbedRequest(["gamma poison"]), EmbedRequest(["delta"])]
    good1, bad, good2 = engine.run(calls)
    assert isinstance(bad, RuntimeError) and "injected fault" in str(bad)
    assert worst_cosine(good1.vectors, minilm.encode(["alpha", "beta"])) >= 0.9999
    assert worst_cosine(good2.vectors, minilm.encode(["delta"])) >= 0.9999
    stats = engine.stats()
    assert stats["failed_calls"] == 1 and stats["calls"] == 3


def test_normalize_flag(backend):
    engine = EmbeddingEngine(backend, Batching())
    plain, normed = engine.run(
        [
            EmbedRequest(["x y z"], EmbedOptions(normalize=False)),
            EmbedRequest(["x y z"], EmbedOptions(normalize=True)),
        ]
    )
    assert abs(np.linalg.norm(normed.vectors[0]) - 1) < 1e-5
    assert np.isfinite(plain.vectors).all()


class RecordingBackend(SentenceTransformersBackend):
    """The real backend, noting how many characters each tokenised string had."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: list[int] = []

    def tokenize(self, texts, prompt, max_length=None):
        self.read += [len(t) for t in texts]
        return super().tokenize(texts, prompt, max_length)


@pytest.fixture(scope="module")
def recording():
    return RecordingBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=256)


def test_a_huge_input_is_read_only_as_far_as_max_seq_length_reaches(recording, minilm):
    words = "radioactivity polonium laboratory Sorbonne physicist chemistry".split()
    huge = " ".join(words[i % len(words)] for i in range(3_500_000))  # 20 MB
    recording.read.clear()
    [item] = tokenize_capped(recording, [huge], "", True)
    assert len(recording.read) == 1 and recording.read[0] <= CHARS_PER_TOKEN_FIRST * 256  # one 2 KB read
    assert item.length == 256
    full = minilm.tokenizer(huge[:200_000], truncation=True, max_length=256)["input_ids"]
    assert item.features["input_ids"].tolist() == full  # what tokenising the whole text gives


def test_a_text_sparse_in_tokens_is_read_further():
    backend = RecordingBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=64)
    sparse = ("x" + " " * 40) * 200  # 41 characters per token: the first 8 x 64 characters hold 13
    [item] = tokenize_capped(backend, [sparse], "", True)
    assert item.length == 64 and len(backend.read) > 1 and max(backend.read) <= CHARS_PER_TOKEN_CEILING * 64
    full = backend.model.tokenizer(sparse, truncation=True, max_length=64)["input_ids"]
    assert item.features["input_ids"].tolist() == full


def test_cut_text_ends_at_a_whitespace():
    assert cut_text("short", 10) == "short"
    assert cut_text("alpha beta gamma", 12) == "alpha beta"
    assert cut_text("x" * 100, 10) == "x" * 10  # no whitespace near the cut: cut where asked


def test_truncate_false_refuses_beyond_the_ceiling_and_names_the_input(recording):
    too_long = "a " * (CHARS_PER_TOKEN_CEILING * 256)
    with pytest.raises(ClientError) as err:
        tokenize_capped(recording, ["fine", too_long], "", False)
    assert err.value.status == 400 and err.value.index == 1
    assert err.value.message.startswith("input[1]: ") and "characters" in err.value.message
    with pytest.raises(ClientError) as err:
        tokenize_capped(recording, ["fine", "word " * 300], "", False)
    assert err.value.index == 1 and "input[1]" in err.value.message and "256 tokens" in err.value.message


def test_engine_answers_a_small_call_during_a_bulk_one_and_drops_a_cancelled_one(minilm):
    bulk_texts = [f"entity {i} described at some length for the bulk request " * 4 for i in range(400)]
    backend = SentenceTransformersBackend(MINILM_DIR, device=torch.device("cpu"), max_seq_length=128)
    engine = EmbeddingEngine(backend, Batching(max_batch_tokens=1024, max_batch_size=64))

    async def main():
        bulk = asyncio.ensure_future(engine.embed(EmbedRequest(bulk_texts)))
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        small = await engine.embed(EmbedRequest(["Marie Curie"]))
        small_s = time.perf_counter() - t0
        bulk_done_when_small_answered = bulk.done()
        await bulk
        leaver = asyncio.ensure_future(engine.embed(EmbedRequest(bulk_texts)))
        await asyncio.sleep(0.3)
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        after = await engine.embed(EmbedRequest(["Warsaw"]))
        return small, small_s, bulk_done_when_small_answered, bulk.result(), after

    try:
        small, small_s, bulk_was_done, bulk, after = asyncio.run(main())
    finally:
        engine.close()
    assert not bulk_was_done  # the small call did not wait for the bulk call
    expected = minilm.encode(["Marie Curie"] + bulk_texts[:3])
    assert float(small.vectors[0] @ expected[0]) >= 0.9999
    assert min(float(a @ b) for a, b in zip(bulk.vectors[:3], expected[1:], strict=True)) >= 0.9999
    assert after.vectors.shape == (1, 384)
    stats = engine.stats()
    assert stats["dropped_inputs"] > 200 and stats["cancelled_calls"] == 1
    assert stats["queue_inputs"] == 0
