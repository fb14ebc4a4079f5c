"""An in-memory embedding cache per model: repeated texts are answered without model work or a hop.

Pipelines embed the same strings again and again (entity names recur across chunks, retrievers re-encode
their queries). The ingress keeps, per model, the native vectors it has already returned, keyed by a
128-bit BLAKE2b digest of everything that decides a vector: model, prompt text, normalize, truncate and
the text itself (not ``dimensions``: shortening is applied to the cached native vector afterwards, as
to a fresh one). A hit returns the very bytes the miss returned, with the same token count.

The cache is bounded in bytes (vector, key and bookkeeping of each entry) and evicts the least recently
used entries. Plain Python: no Ray here.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Bookkeeping per entry beyond the vector's own bytes: the 16-byte key, the OrderedDict node, the
# tuple and the ndarray header (measured with tracemalloc: ~260 bytes on CPython 3.11).
ENTRY_OVERHEAD_BYTES = 260


def cache_key(model: str, prompt: str, normalize: bool, truncate: bool, text: str) -> bytes:
    """The digest that identifies one vector: equal inputs give equal keys, any difference another key."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (model, prompt, "n" if normalize else "-", "t" if truncate else "-"):
        digest.update(part.encode())
        digest.update(b"\x00")  # a separator no model name or prompt can forge into another split
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.digest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self.stats = CacheStats()

    def get(self, key: bytes) -> tuple[np.ndarray, int] | None:
        """(vector, tokens) for a key seen before, marking it recently used; None on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: bytes, vector: np.ndarray, tokens: int) -> int:
        """Keep a computed vector (copied, read-only); returns how many entries were evicted for it."""
        size = vector.nbytes + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes or key in self._entries:
            return 0
        stored = np.array(vector, dtype=vector.dtype, copy=True)
        stored.flags.writeable = False  # shared by every later hit: nobody may change it in place
        self._entries[key] = (stored, int(tokens))
        self.stats.bytes += size
        evicted = 0
        while self.stats.bytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.stats.bytes -= old.nbytes + ENTRY_OVERHEAD_BYTES
            evicted += 1
        self.stats.evictions += evicted
        self.stats.entries = len(self._entries)
        return evicted


@dataclass
class Lookup:
    """One request's texts split into cached vectors and the distinct texts still to compute."""

    found: list[tuple[np.ndarray, int] | None]  # per input: (vector, tokens) when cached
    missing: list[str]  # distinct texts to compute, in first-seen order
    keys: list[bytes]  # the key of each missing text
    where: list[list[int]]  # the input positions of each missing text

    @property
    def complete(self) -> bool:
        return not self.missing


def look_up(cache: EmbeddingCache, keys: list[bytes], texts: list[str]) -> Lookup:
    """Which inputs the cache answers; a text repeated within the request is computed once."""
    found: list[tuple[np.ndarray, int] | None] = []
    slot: dict[bytes, int] = {}
    lookup = Lookup(found, [], [], [])
    for i, (key, text) in enumerate(zip(keys, texts, strict=True)):
        if key in slot:  # repeated within this request: counted neither hit nor miss again
            found.append(None)
            lookup.where[slot[key]].append(i)
            continue
        entry = cache.get(key)
        found.append(entry)
        if entry is None:
            slot[key] = len(lookup.missing)
            lookup.missing.append(text)
            lookup.keys.append(key)
            lookup.where.append([i])
    return lookup


def assemble(
    cache: EmbeddingCache, lookup: Lookup, vectors: np.ndarray | None, tokens: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The request's (vectors [n, dim], tokens [n]) from the cached entries and the computed rows of its
    missing texts (which are cached on the way)."""
    rows = list(lookup.found)
    if lookup.missing:
        assert vectors is not None and tokens is not None
        for m, (key, positions) in enumerate(zip(lookup.keys, lookup.where, strict=True)):
            cache.put(key, vectors[m], int(tokens[m]))
            for i in positions:
                rows[i] = (vectors[m], int(tokens[m]))
    out = np.stack([row[0] for row in rows])  # type: ignore[index]
    return out, np.array([row[1] for row in rows], dtype=np.int64)  # type: ignore[index]
