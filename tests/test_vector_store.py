"""The disk cache (``cache.disk_gb``): vectors kept across starts, keyed by what computed them.

Real SQLite files, the real MiniLM behind a real engine; the served test restarts the model's replica
(a new process) and checks the second run is answered from disk without a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from deployments.config import Batching, ModelEntry
from deployments.engine.backends.registry import load_sentence_transformers
from deployments.engine.embedding_engine import EmbeddingEngine
from deployments.engine.vector_store import (
    StoredModel,
    VectorStore,
    open_store,
    served_fingerprint,
    store_path,
)
from deployments.protocol.errors import ClientError
from deployments.protocol.options import EmbedOptions, EmbedRequest
from tests.conftest import MINILM, MINILM_DIR, model_entry, models_config

SERVED = {
    "backend": "sentence-transformers",
    "runtime": "torch",
    "precision": "float32",
    "device": "cpu",
    "dimension": 384,
    "max_seq_length": 128,
}
TEXTS = ["Marie Curie", "Pierre Curie", "radium", "the Sorbonne", "polonium was named after Poland"]


@pytest.fixture
def model_copy(tmp_path) -> Path:
    copy = tmp_path / "minilm"
    shutil.copytree(MINILM_DIR, copy)
    return copy


# ---- the fingerprint ----------------------------------------------------------------------------------
def test_fingerprint_follows_the_files_and_what_computes(model_copy):
    first = served_fingerprint(model_copy, **SERVED)
    assert served_fingerprint(model_copy, **SERVED) == first
    assert served_fingerprint(model_copy, **{**SERVED, "device": "cuda:0"}) == served_fingerprint(
        model_copy, **{**SERVED, "device": "cuda:1"}
    )
    for change in (
        {"runtime": "openvino"},
        {"precision": "bfloat16"},
        {"device": "cuda:0"},
        {"max_seq_length": 256},
        {"layout": "packed"},
    ):
        assert served_fingerprint(model_copy, **{**SERVED, **change}) != first, change
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', ' "hidden_act"'))  # a small file: content
    second = served_fingerprint(model_copy, **SERVED)
    assert second != first
    weights = model_copy / "model.safetensors"  # a large file: size and modification time
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert served_fingerprint(model_copy, **SERVED) != second


def test_a_hub_blob_is_identified_by_its_content_hash(model_copy, tmp_path):
    """In the Hugging Face cache a weight file links to a blob named by its SHA-256: that name is taken."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    weights = model_copy / "model.safetensors"
    blob = blobs / ("a" * 64)
    shutil.move(weights, blob)
    weights.symlink_to(blob)
    first = served_fingerprint(model_copy, **SERVED)
    os.utime(blob)  # touched: same content, same name
    assert served_fingerprint(model_copy, **SERVED) == first
    other = blobs / ("b" * 64)  # another revision: another blob
    shutil.copy(blob, other)
    weights.unlink()
    weights.symlink_to(other)
    assert served_fingerprint(model_copy, **SERVED) != first


# ---- the store ------------------------------------------------------------------------------------------
def rows(n: int, dimension: int = 8, seed: int = 0) -> list[tuple[bytes, np.ndarray, int]]:
    vectors = np.random.default_rng(seed).standard_normal((n, dimension)).astype(np.float32)
    return [(i.to_bytes(16, "big"), vectors[i], 3 + i) for i in range(n)]


def test_rows_come_back_byte_identical_and_keys_carry_the_fingerprint(tmp_path):
    path = tmp_path / "m.sqlite3"
    store = VectorStore(path, "fingerprint-a", 8, 2**20)
    kept = rows(5)
    store.write(kept)
    found, stale = store.get_many([k for k, _, _ in kept] + [b"x" * 16])
    assert stale == []  # just written: their use stamps are fresh, a read writes nothing
    assert len(found) == 5 and store.stats.hits == 5 and store.stats.misses == 1
    for key, vector, tokens in kept:
        assert found[key][0].tobytes() == vector.tobytes() and found[key][1] == tokens
    options = EmbedOptions()
    other = VectorStore(path, "fingerprint-b", 8, 2**20)  # the same file, another model's fingerprint
    assert store.key(options, "Marie Curie") != other.key(options, "Marie Curie")
    assert store.key(options, "Marie Curie") != store.key(EmbedOptions(prompt="query: "), "Marie Curie")
    assert store.key(options, "Marie Curie") != store.key(EmbedOptions(normalize=False), "Marie Curie")
    reopened = VectorStore(path, "fingerprint-a", 8, 2**20)
    assert reopened.stats.entries == 5 and len(reopened.get_many([k for k, _, _ in kept])[0]) == 5
    assert VectorStore(path, "x", 4, 2**20).get_many([kept[0][0]])[0] == {}  # another width: not its row
    reopened.touch_after_ms = 0  # every row read is due a new stamp
    assert reopened.get_many([kept[0][0], kept[1][0]])[1] == [kept[0][0], kept[1][0]]


def test_least_recently_used_rows_go_past_the_bound(tmp_path):
    """The bound counts the file's pages in use; past it the least recently used rows go, down to 90%."""
    bound = 128 * 1024
    store = VectorStore(tmp_path / "m.sqlite3", "f", 384, bound)
    kept = rows(400, dimension=384)
    store.write(kept[:1])
    touched = False
    for n, row in enumerate(kept[1:], 2):
        time.sleep(0.002)  # use stamps are milliseconds: each row gets its own
        if not touched and store.bytes_used() > 0.8 * bound:
            store.write([], used=[kept[0][0]])  # the oldest row, used again (as StoredModel marks a hit)
            touched, after_touch = True, n
            time.sleep(0.002)
        store.write([row])
        if store.stats.evictions and n > 1.2 * after_touch:
            break
    assert touched and store.stats.evictions > 0
    assert store.bytes_used() <= bound and store.stats.bytes == store.bytes_used()
    left, _ = store.get_many([k for k, _, _ in kept[:n]])
    assert kept[0][0] in left  # used again: kept
    assert kept[1][0] not in left and kept[2][0] not in left  # the least recently used: gone
    assert kept[n - 1][0] in left
    assert store.stats.entries == len(left) == n - store.stats.evictions

    def pages() -> int:  # the file's pages, in use or free (in the write-ahead log until a checkpoint)
        return int(store._db.execute("PRAGMA page_count").fetchone()[0])

    size = pages()
    for row in rows(200, dimension=384, seed=1):  # evicting as it goes: freed pages are reused
        store.write([(b"m" + row[0][1:], row[1], row[2])])
    assert pages() <= size + 4 and store.bytes_used() <= bound


def _row(i: int) -> tuple[bytes, np.ndarray, int]:
    """Row ``i``, the same bytes in every process (two replicas compute the same vector for a text)."""
    return i.to_bytes(16, "big"), np.random.default_rng(i).standard_normal(384).astype(np.float32), 3 + i % 50


def _replica(path: str, first: int, last: int, bound: int, start, done) -> None:
    """One replica's traffic in its own process: rows ``first..last`` written 10 at a time, each write
    followed by a read of the rows the other replica is writing."""
    store = VectorStore(Path(path), "f", 384, bound)
    start.wait()
    for i in range(first, last, 10):
        store.write([_row(j) for j in range(i, i + 10)])
        store.get_many([_row(j)[0] for j in range(1500 - i - 10, 1500 - i)])
    done.put(vars(store.stats))


def test_replicas_on_one_node_share_the_file(tmp_path):
    """Two replicas (processes) write, read and evict in one file at once: no error, no row damaged,
    the bound holds."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    path, bound = tmp_path / "m.sqlite3", 2 * 2**20  # ~1,000 rows of 2.1 KB: both evict as they go
    VectorStore(path, "f", 384, bound).close()
    start, done = context.Event(), context.Queue()
    replicas = [  # rows 0-999 and 500-1499: half of each one's rows are the other's too
        context.Process(target=_replica, args=(str(path), first, first + 1000, bound, start, done))
        for first in (0, 500)
    ]
    for process in replicas:
        process.start()
    start.set()
    stats = [done.get(timeout=120) for _ in replicas]
    for process in replicas:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert [s["errors"] for s in stats] == [0, 0]
    assert all(s["writes"] > 0 and s["hits"] > 0 for s in stats), stats  # each read the other's rows
    assert sum(s["evictions"] for s in stats) > 0, stats
    store = VectorStore(path, "f", 384, bound)
    found, _ = store.get_many([_row(i)[0] for i in range(1500)])
    assert store.bytes_used() <= bound and 700 < len(found) < 1000
    for key, (vector, tokens) in found.items():
        _, expected, expected_tokens = _row(int.from_bytes(key, "big"))
        assert vector.tobytes() == expected.tobytes() and tokens == expected_tokens
    newest = [_row(i) for i in range(2000, 2050)]  # which replica ran ahead varies: rows written after both
    store.write(newest)
    assert len(store.get_many([key for key, _, _ in newest])[0]) == 50 and store.bytes_used() <= bound


def test_a_damaged_file_serves_without_the_store(tmp_path, caplog):
    entry = ModelEntry.model_validate(
        model_entry(cache={"disk_gb": 1, "disk_dir": str(tmp_path / "vectors")}, source=MINILM_DIR)
    )
    path = store_path(tmp_path / "vectors", MINILM)
    path.parent.mkdir()
    path.write_bytes(b"not a database" * 100)
    backend = load_sentence_transformers(MINILM_DIR, max_seq_length=128, threads=1)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert open_store(entry, backend, None) is None
    assert "cannot be opened" in caplog.text and str(path) in caplog.text


# ---- in front of a real engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend():
    return load_sentence_transformers(MINILM_DIR, max_seq_length=128, threads=2)


def stored_engine(backend, tmp_path: Path) -> tuple[StoredModel, EmbeddingEngine]:
    entry = ModelEntry.model_validate(
        model_entry(source=MINILM_DIR, cache={"disk_gb": 0.01, "disk_dir": "vectors"})
    )
    engine = EmbeddingEngine(backend, Batching(forward_overhead_tokens=32))
    store = open_store(entry, backend, tmp_path)
    assert store is not None and store.path.parent == tmp_path / "vectors"
    return StoredModel(store, engine.embed, MINILM), engine


def test_a_second_run_is_answered_from_disk_with_the_same_bytes(backend, tmp_path):
    texts = [*TEXTS, TEXTS[0]]  # a repeat inside the request is computed once

    async def run() -> tuple:
        stored, engine = stored_engine(backend, tmp_path)
        try:
            result = await stored.embed(EmbedRequest(texts))
            stored.flush()
            return result, engine.stats()["rows"], stored.stats()
        finally:
            stored.close()
            engine.close()

    first, first_rows, first_stats = asyncio.run(run())
    assert first_rows == len(TEXTS) and first_stats["disk_cache_writes"] == len(TEXTS)
    second, second_rows, second_stats = asyncio.run(run())  # a new store and engine: a restart
    assert second_rows == 0, "answered from disk: no forward pass"
    assert second_stats["disk_cache_hits"] == len(TEXTS) and second_stats["disk_cache_misses"] == 0
    assert second.vectors.tobytes() == first.vectors.tobytes()
    assert second.token_counts.tolist() == first.token_counts.tolist()
    assert np.array_equal(first.vectors[0], first.vectors[-1])


def test_an_error_names_the_input_by_its_place_in_the_request(backend, tmp_path):
    long = "word " * 400
    strict = EmbedOptions(truncate=False)

    async def run() -> ClientError:
        stored, engine = stored_engine(backend, tmp_path)
        try:
            await stored.embed(EmbedRequest(TEXTS[:3], strict))  # kept
            stored.flush()
            with pytest.raises(ClientError) as caught:
                await stored.embed(EmbedRequest([TEXTS[0], TEXTS[1], TEXTS[3], long], strict))
            return caught.value
        finally:
            stored.close()
            engine.close()

    error = asyncio.run(run())
    assert error.code == "input_too_long" and error.index == 3  # the 2nd of the missing, the 4th input


def test_a_changed_model_never_gets_the_old_vectors(tiny_bge_dir, tmp_path):
    """The same folder and name with new weights: the store's rows of the old weights are never served."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bge"
    shutil.copytree(tiny_bge_dir, folder)
    entry = ModelEntry.model_validate(
        model_entry("bge", source=str(folder), max_seq_length=512, cache={"disk_gb": 0.01, "disk_dir": "v"})
    )

    async def run() -> tuple:
        backend = load_sentence_transformers(str(folder), max_seq_length=512, threads=1)
        engine = EmbeddingEngine(backend, Batching(forward_overhead_tokens=32))
        stored = StoredModel(open_store(entry, backend, tmp_path), engine.embed, "bge")
        try:
            result = await stored.embed(EmbedRequest(TEXTS))
            stored.flush()
            return result.vectors, engine.stats()["rows"], stored.stats()
        finally:
            stored.close()
            engine.close()

    old, _, _ = asyncio.run(run())
    weights = next(folder.rglob("model.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("encoder.layer.1.output.dense.weight"))
    tensors[name] = tensors[name] * 1.5  # fine-tuned, say: same folder, same name, same size
    save_file(tensors, weights, metadata={"format": "pt"})
    new, rows, stats = asyncio.run(run())
    assert rows == len(TEXTS) and stats["disk_cache_hits"] == 0, "computed by the new weights"
    assert stats["disk_cache_entries"] == 2 * len(TEXTS)  # the old rows stay until they age out
    assert not np.allclose(new, old, atol=1e-3)


def test_config_asks_for_a_layer():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="give max_mb"):
        ModelEntry.model_validate(model_entry(cache={}))
    entry = ModelEntry.model_validate(model_entry(cache={"disk_gb": 2}))
    assert entry.cache.max_mb is None and entry.cache.disk_dir.endswith("graphrag-embeddings/vectors")


# ---- served: the replica restarted, the same texts answered from its disk ----------------------------------
def test_a_restarted_replica_answers_the_last_run_from_disk(tmp_path_factory, tmp_path):
    import httpx
    from ray import serve

    from tests.conftest import deploy_app, start_private_ray, start_serve, write_models_config

    entry = model_entry(cache={"disk_gb": 0.1, "disk_dir": str(tmp_path / "vectors")}, runtime="torch")
    config = write_models_config(tmp_path / "models.yaml", models_config(entry))
    ray = start_private_ray(tmp_path_factory, num_cpus=3)
    try:
        url = start_serve()

        def run() -> tuple[list, dict]:
            deploy_app(config)
            answer = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "model": MINILM}, timeout=60)
            assert answer.status_code == 200, answer.text
            stats = serve.get_deployment_handle(MINILM, "embeddings").stats.remote().result()
            return answer.json()["data"], stats

        first, first_stats = run()
        assert first_stats["disk_cache_writes"] == len(TEXTS) and first_stats["disk_cache_hits"] == 0
        serve.delete("embeddings")  # the replica's process ends; its rows stay on disk
        second, second_stats = run()
        assert second_stats["disk_cache_hits"] == len(TEXTS), second_stats
        assert second_stats["disk_cache_misses"] == 0
        assert second_stats["rows"] <= 1, "no pass but a health check's (which never reads the store)"
        assert [d["embedding"] for d in second] == [d["embedding"] for d in first]
    finally:
        serve.shutdown()
        ray.shutdown()
