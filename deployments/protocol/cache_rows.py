"""A request's rows split into those a cache holds and those to compute, and the key that identifies a row.

Shared by the ingress's in-memory cache (``deployments/ingress/cache.py``) and a replica's store on disk
(``deployments/engine/vector_store.py``): both key a vector by a digest of everything that decides it, and
both answer a request from their rows plus the computed rows of its other texts. Plain Python.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class RowCache(Protocol):
    """What ``look_up`` and ``assemble`` need of a cache: a row by key, and a computed row kept."""

    def get(self, key: bytes) -> tuple[np.ndarray, int] | None: ...

    def put(self, key: bytes, vector: np.ndarray, tokens: int) -> int: ...


def cache_key(model: str, prompt: str, normalize: bool, truncate: bool, text: str) -> bytes:
    """The digest that identifies one vector: equal inputs give equal keys, any difference another key."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (model, prompt, "n" if normalize else "-", "t" if truncate else "-"):
        digest.update(part.encode())
        digest.update(b"\x00")  # a separator no model name or prompt can forge into another split
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.digest()


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


def look_up(cache: RowCache, keys: list[bytes], texts: list[str]) -> Lookup:
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
    cache: RowCache, lookup: Lookup, vectors: np.ndarray | None, tokens: np.ndarray | None
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
