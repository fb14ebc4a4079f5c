"""Prometheus metrics at the points where the service decides, through Ray Serve's metrics API.

Ray's metrics agent exports them on every node's metrics port (``ray start --metrics-export-port``, or
``_metrics_export_port`` of ``ray.init``) with Ray's ``ray_`` prefix, tagged with Serve's application,
deployment and replica besides the tags below. ``ModelMetrics`` is the scheduler's observer in a model
replica; ``RouterMetrics`` counts requests by route and status, and refused API keys; ``CacheMetrics``
follows one model's embedding cache at the ingress, or its store on a replica's disk.
"""

from __future__ import annotations

from typing import Any

from ray.serve import metrics

SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def _per_model(kind: type, name: str, description: str, model: str, tags: tuple = (), **kwargs: Any) -> Any:
    """A metric tagged with its model. Serve's ``set_default_tags`` adds its own tags to the dict it is given
    and returns None: hence a fresh dict per metric, and no chaining."""
    metric = kind(name, description, tag_keys=("model", *tags), **kwargs)
    metric.set_default_tags({"model": model})
    return metric


class ModelMetrics:
    """What one model replica's scheduler decides: admissions, queue, waits, passes, dropped work."""

    def __init__(self, model: str):
        counter, gauge, histogram = metrics.Counter, metrics.Gauge, metrics.Histogram
        self._inputs = _per_model(
            counter, "embeddings_inputs", "Inputs admitted to the model's queue.", model
        )
        self._tokens = _per_model(
            counter,
            "embeddings_tokens",
            "Tokens computed by forward passes: kind=real (the inputs') or padded (what passes paid).",
            model,
            ("kind",),
        )
        self._queue = _per_model(
            gauge, "embeddings_queue_depth", "Queued work, in inputs or tokens (unit).", model, ("unit",)
        )
        self._wait = _per_model(
            histogram,
            "embeddings_queue_wait_seconds",
            "Per call: admission to its first forward pass.",
            model,
            boundaries=SECONDS,
        )
        self._rows = _per_model(
            histogram, "embeddings_batch_rows", "Rows per forward pass.", model, boundaries=ROWS
        )
        self._forward = _per_model(
            histogram, "embeddings_forward_seconds", "Time of one forward pass.", model, boundaries=SECONDS
        )
        self._dropped = _per_model(
            counter, "embeddings_dropped_inputs", "Queued inputs dropped: their caller left.", model
        )

    def queue(self, inputs: int, tokens: int) -> None:
        self._queue.set(inputs, tags={"unit": "inputs"})
        self._queue.set(tokens, tags={"unit": "tokens"})

    def admitted(self, inputs: int) -> None:
        self._inputs.inc(inputs)

    def waited(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def ran_pass(self, rows: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        self._rows.observe(rows)
        self._forward.observe(seconds)
        self._tokens.inc(real_tokens, tags={"kind": "real"})
        self._tokens.inc(padded_tokens, tags={"kind": "padded"})

    def dropped(self, inputs: int) -> None:
        if inputs:
            self._dropped.inc(inputs)


class RouterMetrics:
    def __init__(self) -> None:
        self._requests = metrics.Counter(
            "embeddings_requests",
            "HTTP requests by model, route and status code.",
            tag_keys=("model", "route", "status"),
        )
        self._auth_failures = metrics.Counter(
            "embeddings_auth_failures", "Requests refused: missing or wrong API key.", tag_keys=("route",)
        )

    def request(self, model: str | None, route: str, status: int) -> None:
        self._requests.inc(tags={"model": model or "-", "route": route, "status": str(status)})

    def auth_failure(self, route: str) -> None:
        self._auth_failures.inc(tags={"route": route})


class CacheMetrics:
    """One model's embedding cache: in an ingress replica (``layer`` memory: ``embeddings_cache_*``) or a
    model replica's store on disk (``layer`` disk: ``embeddings_disk_cache_*``); lookups by result,
    evictions, bytes held."""

    def __init__(self, model: str, layer: str = "memory"):
        prefix, bound = (
            ("embeddings_cache", "max_mb") if layer == "memory" else ("embeddings_disk_cache", "disk_gb")
        )
        self._lookups = _per_model(
            metrics.Counter,
            f"{prefix}_lookups",
            "Inputs looked up in the embedding cache, by result (hit, miss).",
            model,
            ("result",),
        )
        self._evictions = _per_model(
            metrics.Counter, f"{prefix}_evictions", f"Cache entries evicted to stay in {bound}.", model
        )
        self._bytes = _per_model(metrics.Gauge, f"{prefix}_bytes", "Bytes the cache holds.", model)

    def record(self, hits: int, misses: int, evictions: int, size: int) -> None:
        if hits:
            self._lookups.inc(hits, tags={"result": "hit"})
        if misses:
            self._lookups.inc(misses, tags={"result": "miss"})
        if evictions:
            self._evictions.inc(evictions)
        self._bytes.set(size)
