"""Vectors a replica computed, kept on local disk across starts: a pipeline run again embeds nothing twice.

A GraphRAG pipeline is run again and again on one corpus (a prompt changed, a step fixed): every run
embeds the same chunks, entity names and descriptions. ``cache: {disk_gb: N}`` gives a model's replicas a
store of the vectors they computed, in SQLite (the standard library's, one file per model, shared by the
replicas on a node) under ``cache.disk_dir``. A request's texts found there are answered without model
work; only the others go to the engine, and what it computes is written behind the answer.

Correct across runs: a row's key is a digest of the model's fingerprint (``served_fingerprint``: its
files, the runtime, precision and device that computed it, ``max_seq_length``, the library versions),
the prompt text, normalize, truncate and the text. A changed model, path or library gives other keys,
so a stale vector is never served; the old rows age out. The store holds at most ``disk_gb`` of rows and
evicts the least recently used. A store that cannot be opened, read or written costs a log line and
misses, never a failed request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployments.config import ModelEntry, resolve_model_source
from deployments.engine.backends.base import EmbeddingBackend
from deployments.engine.backends.model_files import local_model_dir, package_versions, update_with_model_files
from deployments.metrics import CacheMetrics
from deployments.protocol.cache_rows import assemble, cache_key, look_up
from deployments.protocol.errors import ClientError, ModelError
from deployments.protocol.options import EmbedOptions, EmbedRequest, EmbedResult

log = logging.getLogger("ray.serve")

# Bumped when what a row holds or how a fingerprint is made changes: older rows are never read.
STORE_FORMAT = 1
# The libraries whose versions decide a vector: what ran the model and what tokenised for it.
FINGERPRINT_PACKAGES = ("torch", "transformers", "sentence-transformers", "openvino", "tokenizers")
# Keys per SQL statement (SQLite's bound on parameters is 32766 on current builds, 999 on old ones).
KEYS_PER_STATEMENT = 500
# When the rows pass the bound, the least recently used go until this share of it is left.
EVICT_TO = 0.9
# SQLite waits this long for another replica's write before a write counts as an error; a read (on the
# event loop) waits at most READ_TIMEOUT_MS, then counts as misses.
BUSY_TIMEOUT_MS = 2000
READ_TIMEOUT_MS = 50
# Keys read per step on the event loop, which is yielded between steps (a step of 64 NV-Embed rows
# reads 1 MB).
READ_CHUNK = 64
# A row read again is stamped as used only when its stamp is older than this: a warm run writes nothing,
# and eviction is least recently used to within this much.
TOUCH_AFTER_MS = 10 * 60 * 1000


def served_fingerprint(
    model_dir: Path,
    *,
    backend: str,
    runtime: str,
    precision: str,
    device: str,
    dimension: int,
    max_seq_length: int,
    layout: str = "",
) -> str:
    """Hex digest of everything besides a request's options that decides the vectors a replica serves
    (``layout``: how a pass lays its inputs out where a backend has a choice, e.g. NV-Embed packed)."""
    digest = hashlib.sha256()
    device_type = device.split(":")[0]  # cuda:0 and cuda:1 compute alike
    digest.update(
        f"store {STORE_FORMAT}; {backend}; {runtime}; {precision}; {device_type}; dimension {dimension}; "
        f"max_seq_length {max_seq_length}; layout {layout}; {package_versions(FINGERPRINT_PACKAGES)}".encode()
    )
    update_with_model_files(digest, model_dir)
    return digest.hexdigest()[:32]


def store_path(directory: Path, model: str) -> Path:
    """The model's file in ``directory``: its name made safe for a file name, plus a digest of the name
    so that two names made alike stay apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[:80]
    return directory / f"{safe}-{hashlib.blake2b(model.encode(), digest_size=4).hexdigest()}.sqlite3"


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0  # rows written
    evictions: int = 0  # rows evicted to stay within the bound
    errors: int = 0  # reads or writes that failed (counted as misses, or not kept)
    entries: int = 0  # rows in the file, as last counted (every replica sharing the file adds to it)
    bytes: int = 0  # bytes of the file's pages in use, as last measured (its write-ahead log aside)


class VectorStore:
    """One model's rows in one SQLite file. Synchronous, with two connections: ``get_many`` reads on the
    caller's thread (``StoredModel``: the event loop; a read costs ~10 us a key, less than a hop to a
    thread), ``write`` writes on another (``StoredModel``'s own); each connection is used by one thread."""

    def __init__(self, path: Path, fingerprint: str, dimension: int, max_bytes: int):
        self.path, self.fingerprint, self.dimension, self.max_bytes = path, fingerprint, dimension, max_bytes
        self.touch_after_ms = TOUCH_AFTER_MS
        self.stats = StoreStats()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer in another replica
        self._db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last rows, never corrupt
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (key BLOB NOT NULL UNIQUE, vector BLOB NOT NULL, "
                "tokens INTEGER NOT NULL, used INTEGER NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS vectors_used ON vectors (used)")
        self.stats.entries = self._count()
        self.stats.bytes = self.bytes_used()
        self._reader = sqlite3.connect(path, timeout=READ_TIMEOUT_MS / 1000, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=1")

    def key(self, options: EmbedOptions, text: str) -> bytes:
        return cache_key(self.fingerprint, options.prompt, options.normalize, options.truncate, text)

    def get_many(self, keys: list[bytes]) -> tuple[dict[bytes, tuple[np.ndarray, int]], list[bytes]]:
        """The rows held for ``keys``, and the keys of those whose use stamp is older than
        ``touch_after_ms`` (for ``write`` to stamp). An error is logged and reads as misses."""
        wanted = list(dict.fromkeys(keys))
        found: dict[bytes, tuple[np.ndarray, int]] = {}
        stale: list[bytes] = []
        old = _now_ms() - self.touch_after_ms
        try:
            for part in _chunks(wanted):
                marks = ",".join("?" * len(part))
                rows = self._reader.execute(
                    f"SELECT key, vector, tokens, used FROM vectors WHERE key IN ({marks})", part
                ).fetchall()
                for key, blob, tokens, used in rows:
                    vector = np.frombuffer(blob, dtype=np.float32)
                    if vector.shape == (self.dimension,):  # anything else is not this model's row
                        found[key] = (vector, int(tokens))
                        if used < old:
                            stale.append(key)
        except sqlite3.Error as exc:
            self._failed("read", exc)
        self.stats.hits += len(found)
        self.stats.misses += len(wanted) - len(found)
        return found, stale

    def write(self, rows: list[tuple[bytes, np.ndarray, int]], used: list[bytes] = ()) -> None:
        """Keep computed ``rows`` and mark the rows of ``used`` keys as used now, in one transaction,
        then evict down to the bound if it was passed; an error is logged."""
        if not rows and not used:
            return
        now = _now_ms()
        values = [
            (key, np.ascontiguousarray(v, dtype=np.float32).tobytes(), int(t), now) for key, v, t in rows
        ]
        try:
            with self._db:
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO vectors (key, vector, tokens, used) VALUES (?, ?, ?, ?)", values
                )
                written = self._db.total_changes - before
                for part in _chunks(list(dict.fromkeys(used))):
                    marks = ",".join("?" * len(part))
                    self._db.execute(f"UPDATE vectors SET used = ? WHERE key IN ({marks})", [now, *part])
            self.stats.writes += written
            self.stats.entries += written
            self.stats.bytes = self.bytes_used()
            if self.stats.bytes > self.max_bytes:
                self._evict()
        except sqlite3.Error as exc:
            self._failed("write", exc)

    def _evict(self) -> None:
        """The least recently used rows out, until the rows left fill ``EVICT_TO`` of the bound (the pages
        they free are reused by the next rows: the file stops growing)."""
        self.stats.entries = self._count()  # other replicas may have written or evicted meanwhile
        per_row = self.stats.bytes / max(1, self.stats.entries)
        excess = self.stats.entries - int(self.max_bytes * EVICT_TO / per_row)
        if excess > 0:
            with self._db:
                cursor = self._db.execute(
                    "DELETE FROM vectors WHERE rowid IN (SELECT rowid FROM vectors ORDER BY used LIMIT ?)",
                    (excess,),
                )
            self.stats.evictions += cursor.rowcount
            self.stats.entries -= cursor.rowcount
        self.stats.bytes = self.bytes_used()

    def bytes_used(self) -> int:
        """Bytes of the file's pages that hold rows or indexes (free pages, kept for reuse, aside): what
        the bound counts. SQLite's write-ahead log beside it is checkpointed at about 4 MB."""
        page_size, pages, free = (
            int(self._db.execute(f"PRAGMA {name}").fetchone()[0])
            for name in ("page_size", "page_count", "freelist_count")
        )
        return page_size * (pages - free)

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM vectors").fetchone()[0])

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        self.stats.errors += 1
        if self.stats.errors == 1 or self.stats.errors % 1000 == 0:
            log.warning(
                "vector store %s: %s failed (%s: %s), %d errors so far",
                self.path,
                what,
                type(exc).__name__,
                exc,
                self.stats.errors,
            )

    def close(self) -> None:
        self._reader.close()
        self._db.close()


class StoredModel:
    """An engine's ``embed`` behind a ``VectorStore``: the texts the store holds are answered from it, the
    others computed. Reads run on the event loop in steps of ``READ_CHUNK`` keys, yielding between them;
    writes (computed rows, use stamps) go to a thread of their own behind the answer."""

    def __init__(
        self, store: VectorStore, compute: Callable[[EmbedRequest], Awaitable[EmbedResult]], model: str
    ):
        self.store, self.compute = store, compute
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vector-store")
        self.metrics = CacheMetrics(model, layer="disk")
        self._evictions = 0  # as last recorded to the metrics (by the writer)
        # Rows to write and keys to stamp, gathered while a write runs: one transaction for all.
        self._pending: tuple[list[tuple[bytes, np.ndarray, int]], list[bytes]] = ([], [])
        self._write_queued = False
        self._pending_lock = threading.Lock()

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        keys = [self.store.key(request.options, t) for t in request.texts]
        rows = _Rows(*await self._read(list(dict.fromkeys(keys))))
        lookup = look_up(rows, keys, request.texts)
        if lookup.complete:
            vectors, counts = assemble(rows, lookup, None, None)
            self._write_behind([], rows.stale)
            return EmbedResult(vectors, counts)
        try:
            computed = await self.compute(EmbedRequest(lookup.missing, request.options))
        except (ClientError, ModelError) as error:  # placed among the missing texts: re-place it
            if error.index is None:
                raise
            raise error.at(lookup.where[error.index][0]) from None
        vectors, counts = assemble(rows, lookup, computed.vectors, computed.token_counts)
        self._write_behind(rows.new, rows.stale)
        return EmbedResult(vectors, counts, computed.queue_seconds, computed.compute_seconds)

    async def _read(self, keys: list[bytes]) -> tuple[dict[bytes, tuple[np.ndarray, int]], list[bytes]]:
        found: dict[bytes, tuple[np.ndarray, int]] = {}
        stale: list[bytes] = []
        for start in range(0, len(keys), READ_CHUNK):
            if start:
                await asyncio.sleep(0)  # other requests get the loop between steps
            part_found, part_stale = self.store.get_many(keys[start : start + READ_CHUNK])
            found.update(part_found)
            stale += part_stale
        self.metrics.record(len(found), len(keys) - len(found), 0, self.store.stats.bytes)
        return found, stale

    def _write_behind(self, rows: list[tuple[bytes, np.ndarray, int]], stamp: list[bytes]) -> None:
        """Written behind the answer, on the store's thread; what comes while a write runs joins the next."""
        if not rows and not stamp:
            return
        with self._pending_lock:
            self._pending[0].extend(rows)
            self._pending[1].extend(stamp)
            if self._write_queued:
                return
            self._write_queued = True
        self._thread.submit(self._write_pending)

    def _write_pending(self) -> None:
        with self._pending_lock:
            (rows, stamp), self._pending = self._pending, ([], [])
            self._write_queued = False
        self.store.write(rows, stamp)
        evictions = self.store.stats.evictions
        self.metrics.record(0, 0, evictions - self._evictions, self.store.stats.bytes)
        self._evictions = evictions

    def stats(self) -> dict[str, int]:
        """The store's counters, named for a replica's ``stats()``: ``disk_cache_hits``, ..."""
        return {f"disk_cache_{k}": v for k, v in vars(self.store.stats).items()}

    def flush(self) -> None:
        """Wait until every write submitted so far is done (tests, shutdown)."""
        self._thread.submit(lambda: None).result()

    def close(self) -> None:
        self._thread.submit(self.store.close)
        self._thread.shutdown(wait=True)


class _Rows:
    """One request's rows read from the store (and which of them to stamp as used), and the computed rows
    to write (``look_up``/``assemble``)."""

    def __init__(self, found: dict[bytes, tuple[np.ndarray, int]], stale: list[bytes]):
        self.found, self.stale = found, stale
        self.new: list[tuple[bytes, np.ndarray, int]] = []

    def get(self, key: bytes) -> tuple[np.ndarray, int] | None:
        return self.found.get(key)

    def put(self, key: bytes, vector: np.ndarray, tokens: int) -> int:
        self.new.append((key, vector, tokens))
        return 0


def _chunks(keys: list[bytes]) -> list[list[bytes]]:
    return [keys[i : i + KEYS_PER_STATEMENT] for i in range(0, len(keys), KEYS_PER_STATEMENT)]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_store(entry: ModelEntry, backend: EmbeddingBackend, base_dir: Path | None) -> VectorStore | None:
    """The store of a model whose config asks for one (``cache.disk_gb``), for what ``backend`` serves;
    None when not asked, or when it cannot be opened (logged: the replica serves without it)."""
    if entry.cache is None or entry.cache.disk_gb is None:
        return None
    directory = Path(entry.cache.disk_dir).expanduser()
    if not directory.is_absolute() and base_dir is not None:
        directory = base_dir / directory
    model_dir = local_model_dir(resolve_model_source(entry.source, base_dir))
    if model_dir is None:
        log.warning("%s: no local model files to fingerprint; serving without the disk cache", entry.name)
        return None
    serving = backend.serving
    fingerprint = served_fingerprint(
        model_dir,
        backend=entry.backend,
        runtime=serving.runtime,
        precision=serving.precision,
        device=str(backend.device),
        dimension=backend.dimension,
        max_seq_length=backend.max_seq_length,
        layout="packed" if getattr(backend, "packed", False) else "",
    )
    path = store_path(directory, entry.name)
    try:
        store = VectorStore(path, fingerprint, backend.dimension, int(entry.cache.disk_gb * 2**30))
    except (OSError, sqlite3.Error) as exc:
        log.warning(
            "%s: disk cache %s cannot be opened (%s: %s); serving without it",
            entry.name,
            path,
            type(exc).__name__,
            exc,
        )
        return None
    log.info(
        "%s: disk cache %s (fingerprint %s, %d rows, %.1f of %.1f GB)",
        entry.name,
        path,
        fingerprint,
        store.stats.entries,
        store.stats.bytes / 2**30,
        store.max_bytes / 2**30,
    )
    return store
