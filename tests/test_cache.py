"""The embedding cache (plain Python): keys, byte bound, LRU order, and request assembly."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.ingress.cache import ENTRY_OVERHEAD_BYTES, EmbeddingCache
from deployments.protocol.cache_rows import assemble, cache_key, look_up


def vec(i: int, dim: int = 4) -> np.ndarray:
    return np.full(dim, i, dtype=np.float32)


def test_keys_differ_in_every_part_that_decides_a_vector():
    base = ("m", "query: ", True, True, "Marie Curie")
    keys = {cache_key(*base)}
    for i, other in enumerate(["m2", "passage: ", False, False, "Marie Curie "]):
        changed = list(base)
        changed[i] = other
        keys.add(cache_key(*changed))
    assert len(keys) == 6
    assert cache_key(*base) == cache_key(*base)
    # the separator keeps a prompt's end from passing for the model name's
    assert cache_key("ab", "c", True, True, "x") != cache_key("a", "bc", True, True, "x")
    assert len(cache_key("m", "", True, True, "\ud800 lone surrogate")) == 16


def test_the_byte_bound_evicts_the_least_recently_used():
    entry = vec(0).nbytes + ENTRY_OVERHEAD_BYTES
    cache = EmbeddingCache(max_bytes=3 * entry)
    for i in range(3):
        cache.put(bytes([i]), vec(i), tokens=i)
    assert cache.get(bytes([0]))[1] == 0  # 0 is now the most recently used
    assert cache.put(bytes([3]), vec(3), tokens=3) == 1
    assert cache.get(bytes([1])) is None  # the least recently used went
    assert [cache.get(bytes([i]))[1] for i in (0, 2, 3)] == [0, 2, 3]
    s = cache.stats
    assert (s.hits, s.misses, s.evictions, s.entries, s.bytes) == (4, 1, 1, 3, 3 * entry)


def test_stored_vectors_are_copies_nobody_can_change():
    cache = EmbeddingCache(max_bytes=1 << 20)
    original = vec(7)
    cache.put(b"k", original, 2)
    original[:] = 0
    stored, tokens = cache.get(b"k")
    assert stored.tolist() == [7.0] * 4 and tokens == 2
    with pytest.raises(ValueError):
        stored[0] = 1


def test_an_entry_larger_than_the_cache_is_not_kept():
    cache = EmbeddingCache(max_bytes=100)
    assert cache.put(b"k", vec(1, dim=64), 1) == 0
    assert cache.get(b"k") is None and cache.stats.bytes == 0


def test_a_request_gets_cached_rows_and_computes_each_missing_text_once():
    cache = EmbeddingCache(max_bytes=1 << 20)
    cache.put(b"b", vec(2), 20)
    texts = ["a", "b", "a", "c", "b"]
    lookup = look_up(cache, [t.encode() for t in texts], texts)
    assert lookup.missing == ["a", "c"] and lookup.where == [[0, 2], [3]]
    vectors, tokens = assemble(cache, lookup, np.stack([vec(1), vec(3)]), np.array([10, 30]))
    assert vectors[:, 0].tolist() == [1, 2, 1, 3, 2] and tokens.tolist() == [10, 20, 10, 30, 20]
    again = look_up(cache, [t.encode() for t in texts], texts)
    assert again.complete
    vectors_again, tokens_again = assemble(cache, again, None, None)
    assert vectors_again.tobytes() == vectors.tobytes() and tokens_again.tolist() == tokens.tolist()
    assert (cache.stats.hits, cache.stats.misses) == (2 + 5, 2)
