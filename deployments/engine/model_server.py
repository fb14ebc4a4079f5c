"""One model served: ``ModelServer`` (backend + engine, no Serve decorator) and ``ModelDeployment``, the
per-model Ray Serve deployment around it (named after the model in the app). The ingress runs a
``ModelServer`` itself for ``router.in_process_model``.

Every call is admitted at once (no gathering window): the engine tokenises it on its tokenizer thread,
the scheduler decides each forward pass on its model thread, and each call is answered as soon as its
own rows are done. The event loop only awaits, so the replica keeps taking requests and answering
Serve's health checks during long work. When Serve cancels a call (its caller hung up, timed out or
cancelled), the ``asyncio.CancelledError`` reaches ``engine.embed``, which drops the call's queued rows.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve

from deployments.config import ModelEntry
from deployments.engine.allocator import active_allocator
from deployments.engine.backends import load_backend
from deployments.engine.embedding_engine import EmbeddingEngine
from deployments.engine.gpu_share import gpu_memory_gb, prepare_gpu, warm_up
from deployments.engine.vector_store import StoredModel, open_store
from deployments.metrics import ModelMetrics
from deployments.protocol.errors import ClientError, ModelError, quiet_client_errors
from deployments.protocol.options import EmbedRequest, EmbedResult

HEALTH_TEXT = "health check"
log = logging.getLogger("ray.serve")


def _cpu_threads() -> int:
    """The CPUs Ray gave this replica (at least 1): torch and OpenVINO would otherwise take every core."""
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, int(assigned))


def _gpu_fraction() -> float:
    """The GPUs Ray gave this replica: a fraction of one on shared placements."""
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0))


class ModelServer:
    def __init__(self, entry: dict[str, Any], config_dir: str | None = None):
        self.entry = ModelEntry.model_validate(entry)
        quiet_client_errors(log)
        self.allocator = active_allocator()
        if self.allocator == "glibc malloc":
            log.warning(
                "%s: running on glibc malloc, whose arenas grow under long traffic; install jemalloc "
                "(make setup, or apt-get install libjemalloc2)",
                self.entry.name,
            )
        else:
            log.info("%s: allocator %s", self.entry.name, self.allocator)
        use_gpu = bool(ray.get_gpu_ids())
        base_dir = Path(config_dir) if config_dir else None
        if use_gpu:  # its share of the GPU checked and capped before the weights load
            prepare_gpu(self.entry, _gpu_fraction(), base_dir)
        self.backend = load_backend(self.entry, use_gpu=use_gpu, base_dir=base_dir, threads=_cpu_threads())
        if getattr(self.backend.device, "type", None) == "cuda":  # an out-of-memory shows now, not in traffic
            warm_up(self.backend, self.entry.batching, self.entry.name)
        self.received_calls = 0  # embed_requests calls, each a list of requests
        self.received_requests = 0
        self.engine = EmbeddingEngine(
            self.backend,
            self.entry.batching,
            thread_init=self.backend.init_thread,
            observer=ModelMetrics(self.entry.name),
        )
        store = open_store(self.entry, self.backend, base_dir)  # cache.disk_gb: vectors kept across starts
        self.stored = StoredModel(store, self.engine.embed, self.entry.name) if store is not None else None
        self._embed = self.stored.embed if self.stored is not None else self.engine.embed

    async def embed_requests(self, requests: list[EmbedRequest]) -> list[EmbedResult | Exception]:
        """Each request answered on its own, all admitted at once: its vectors, tokens and timings, or the
        error about one of its own inputs (``ClientError``, ``ModelError``; ``index`` is the input's place
        in that request). A fault of the replica (its device failed, ...) is no request's doing: it raises
        for the whole call, which the caller sends again elsewhere."""
        self.received_calls += 1
        self.received_requests += len(requests)
        if len(requests) == 1:  # the in-process model's every call: no task to gather
            try:
                return [await self._embed(requests[0])]
            except (ClientError, ModelError) as error:
                return [error]
        answers = await asyncio.gather(*(self._embed(r) for r in requests), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, (ClientError, ModelError)):
                raise answer
        return answers  # type: ignore[return-value]

    async def ping(self) -> bool:
        """True once a real text has gone through the whole batching path (never from the disk cache)."""
        answer = await self.engine.embed(EmbedRequest([HEALTH_TEXT], self.entry.request_options()))
        return isinstance(answer, EmbedResult) and answer.vectors.shape == (1, self.backend.dimension)

    def check_health(self) -> None:
        """Serve's health check: fails once the device failed for good (a poisoned CUDA context), so Serve
        replaces this replica instead of keeping one that would fail every call."""
        self.engine.health()

    def info(self) -> dict[str, Any]:
        """What this replica serves, what computes it (runtime, precision, fidelity) and where it runs
        (node, GPUs Ray assigned to it)."""
        context = ray.get_runtime_context()
        serving = self.backend.serving
        return {
            "name": self.entry.name,
            "dimension": self.backend.dimension,
            "max_seq_length": self.backend.max_seq_length,
            "device": str(self.backend.device),
            "runtime": serving.runtime,
            "precision": serving.precision,
            "fidelity_worst_cosine": serving.worst_cosine,
            "serving_note": serving.note,
            "load_seconds": {k: round(v, 3) for k, v in self.backend.load_seconds.items()},
            "forward_overhead_tokens": self.engine.batching.forward_overhead_tokens,
            "forward_overhead_source": self.engine.overhead_source,
            "allocator": self.allocator,
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def stats(self) -> dict[str, float | int]:
        """The scheduler's counters and queue gauges (see ``Scheduler.stats``; its ``calls`` are requests),
        the calls this replica received (``received_calls``, each holding ``received_requests`` /
        ``received_calls`` requests on average: how much the router's coalescer merged), and on a GPU the
        memory torch holds there (``gpu_share.gpu_memory_gb``)."""
        return {
            **self.engine.stats(),
            "received_calls": self.received_calls,
            "received_requests": self.received_requests,
            **gpu_memory_gb(self.backend.device),
            **(self.stored.stats() if self.stored is not None else {}),
        }

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        stored = getattr(self, "stored", None)
        if stored is not None:
            self.stored = None
            stored.close()

    def __del__(self) -> None:
        self.close()


# The per-model deployment: the same object, one per replica, called by handle from the router.
ModelDeployment = serve.deployment(name="ModelServer")(ModelServer)
