"""One model's batching engine: many callers' requests in, one result per caller out.

Plain Python around a backend, so it is tested without Ray. Each call is tokenised on its own (a bad
call fails alone), all inputs are planned together into micro-batches, and a micro-batch whose forward
pass fails is retried row by row so that only the callers owning a failing row see an error.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np

from deployments.backends.base import EmbeddingBackend, EncodedText
from deployments.batching import plan_micro_batches
from deployments.config import Batching


@dataclass(frozen=True)
class EmbedCall:
    texts: list[str]
    prompt: str = ""
    normalize: bool = True
    truncate: bool = True


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [len(texts), dimension]
    token_counts: np.ndarray  # int32 [len(texts)]: tokens each input took, special tokens included


@dataclass
class EngineStats:
    """Counters a test or an operator reads to see what batching achieved."""

    runs: int = 0  # engine invocations (one per gathered batch of calls)
    calls: int = 0
    inputs: int = 0
    forward_passes: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    failed_calls: int = 0


class EmbeddingEngine:
    def __init__(self, backend: EmbeddingBackend, batching: Batching):
        self.backend = backend
        self.batching = batching
        self._stats = EngineStats()
        self._lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return asdict(self._stats)

    def run(self, calls: list[EmbedCall]) -> list[EmbedResult | Exception]:
        """Embed every call's texts; a call's result is its vectors or the exception that sank it."""
        results: list[EmbedResult | Exception | None] = [None] * len(calls)
        items: list[EncodedText] = []
        owner: list[int] = []  # call index of each flat item
        for c, call in enumerate(calls):
            try:
                encoded = self.backend.tokenize(call.texts, call.prompt, call.truncate) if call.texts else []
            except Exception as exc:  # noqa: BLE001 - the caller gets it, the others carry on
                results[c] = exc
                continue
            items.extend(encoded)
            owner.extend([c] * len(encoded))

        plan = plan_micro_batches(
            [it.length for it in items],
            self.batching.max_batch_tokens,
            self.batching.max_batch_size,
            self.batching.forward_overhead_tokens,
            packed=self.backend.packed,
        )
        vectors = np.zeros((len(items), self.backend.dimension), dtype=np.float32)
        failures: dict[int, Exception] = {}
        passes = 0
        for rows in plan.batches:
            passes += 1
            try:
                vectors[rows] = self.backend.forward([items[i] for i in rows])
                continue
            except Exception as exc:  # noqa: BLE001
                if len(rows) == 1:
                    failures[int(rows[0])] = exc
                    continue
            for i in rows:  # isolate the failing rows
                passes += 1
                try:
                    vectors[i] = self.backend.forward([items[i]])[0]
                except Exception as exc:  # noqa: BLE001
                    failures[int(i)] = exc

        starts = np.searchsorted(np.asarray(owner, dtype=np.int64), np.arange(len(calls) + 1))
        for c, call in enumerate(calls):
            if results[c] is not None:
                continue
            lo, hi = int(starts[c]), int(starts[c + 1])
            failed = [i for i in range(lo, hi) if i in failures]
            if failed:
                first = failures[failed[0]]
                results[c] = RuntimeError(f"embedding failed for input[{failed[0] - lo}]: {first!r}")
                continue
            out = vectors[lo:hi]
            if call.normalize and len(out):
                out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            if not np.isfinite(out).all():
                results[c] = RuntimeError("the model produced non-finite values")
                continue
            counts = np.fromiter((it.length for it in items[lo:hi]), dtype=np.int32, count=hi - lo)
            results[c] = EmbedResult(np.ascontiguousarray(out, dtype=np.float32), counts)

        with self._lock:
            s = self._stats
            s.runs += 1
            s.calls += len(calls)
            s.inputs += len(items)
            s.forward_passes += passes
            s.real_tokens += plan.real_tokens
            s.padded_tokens += plan.padded_tokens
            s.failed_calls += sum(isinstance(r, Exception) for r in results)
        return results  # type: ignore[return-value]
