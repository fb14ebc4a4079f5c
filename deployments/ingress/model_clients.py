"""How the router reaches a model: in process (``router.in_process_model``) or by handle (a model
deployment). One protocol, two implementations, so the router never asks which one it holds, and a
third that puts a model's embedding cache in front of either.

The remote one owns what only a hop needs: the coalescer that merges concurrent requests into few calls,
the retries of a call whose replica was lost, the bisection that isolates an input that takes replicas
down, and the cache of the model's ``info()``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Protocol

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.engine.device_faults import DeviceAlreadyFailed, DeviceFault
from deployments.engine.model_server import ModelServer
from deployments.ingress.cache import EmbeddingCache
from deployments.ingress.coalescer import Coalescer
from deployments.metrics import CacheMetrics
from deployments.protocol.cache_rows import assemble, cache_key, look_up
from deployments.protocol.errors import ClientError, InputFault, ModelError, original_error
from deployments.protocol.options import EmbedRequest, EmbedResult

logger = logging.getLogger("ray.serve")
# How long /v1/models (and so a client's constructor) waits for a model's replica before listing it pending.
INFO_TIMEOUT_S = 3.0
# Replicas a call may take down in a row before it is split to find the input that does.
REPLICA_LOSSES_BEFORE_SPLIT = 2


class ModelClient(Protocol):
    # The Serve deployment that runs the model; None: the router's own (the in-process model).
    deployment: str | None

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The request's result; raises its error (naming an input by its place in the request)."""

    async def info(self) -> dict[str, Any] | None:
        """The model's ``info()``; None while no replica answers within seconds (replicas pending)."""

    def known_info(self) -> dict[str, Any] | None:
        """``info()`` if already known, without waiting for anything."""

    async def ping(self) -> bool:
        """True once a real text has gone through the model's whole batching path."""


class LocalModel:
    """The model the router replica runs itself: a call is a method call, no hop, no retry."""

    deployment = None

    def __init__(self, entry: dict[str, Any], config_dir: str | None):
        self.server = ModelServer(entry, config_dir)
        self._info: dict[str, Any] | None = None

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        [answer] = await self.server.embed_requests([request])
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def info(self) -> dict[str, Any] | None:
        return self.known_info()

    def known_info(self) -> dict[str, Any] | None:
        if self._info is None:
            self._info = self.server.info()
        return self._info

    async def ping(self) -> bool:
        return await self.server.ping()

    def stats(self) -> dict[str, float | int]:
        """The scheduler's counters (see ``Scheduler.stats``)."""
        return self.server.stats()

    def close(self) -> None:
        self.server.close()


class RemoteModel:
    """A model deployment reached by handle. Concurrent requests travel merged, each kept whole (the
    coalescer allows two calls in flight per replica the model may have)."""

    def __init__(self, name: str, handle: DeploymentHandle, max_replicas: int):
        self.deployment = name
        self.handle = handle
        self._info: dict[str, Any] | None = None
        self.coalescer = Coalescer(self._send, max_in_flight=2 * max_replicas)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self.coalescer.submit(request)

    async def info(self) -> dict[str, Any] | None:
        if self._info is None:
            response = self.handle.info.remote()
            try:
                self._info = await asyncio.wait_for(_awaited(response), INFO_TIMEOUT_S)
            except asyncio.TimeoutError:
                response.cancel()
        return self._info

    def known_info(self) -> dict[str, Any] | None:
        return self._info

    async def ping(self) -> bool:
        return await self.handle.ping.remote()

    async def _send(self, requests: list[EmbedRequest]) -> list[EmbedResult | Exception]:
        """One call to the model deployment: an answer per request (its result, or its own error).

        Embedding is idempotent, so a call lost with its replica (killed, crashed, node gone, or its GPU
        failed for good: ``DeviceFault``, after which Serve replaces it) is sent again. A call that loses
        ``REPLICA_LOSSES_BEFORE_SPLIT`` replicas in a row is split (``_send_split``) down to the one input
        that takes replicas down, which is refused while the others are answered. The router's request
        timeout bounds the whole."""
        losses = 0
        for attempt in itertools.count():
            response = self.handle.embed_requests.remote(requests)
            try:
                return await response
            except asyncio.CancelledError:  # every caller of this call left: the replica drops its rows
                response.cancel()
                raise
            except ReplicaUnavailableError:  # no replica to take it yet (starting, replacing a lost one)
                pass
            except Exception as exc:
                if isinstance(original_error(exc), DeviceAlreadyFailed):
                    pass  # refused before any work by a replica being replaced: as above, wait
                elif not _replica_lost(exc):
                    raise
                else:
                    losses += 1
                    inputs = sum(len(r.texts) for r in requests)
                    logger.warning(
                        "model %s: replica lost (%s) with a call of %d inputs on it (%d in a row)",
                        self.deployment, _lost_how(exc), inputs, losses,
                    )  # fmt: skip
                    if losses >= REPLICA_LOSSES_BEFORE_SPLIT:
                        return await self._send_split(requests, losses)
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    async def _send_split(self, requests: list[EmbedRequest], losses: int) -> list[EmbedResult | Exception]:
        """The requests in halves, each sent on its own; one request's texts in halves, down to the input
        that crashes the model server, refused as a ``ModelError`` with its index in its request."""
        if len(requests) > 1:
            half = len(requests) // 2
            return await self._send(requests[:half]) + await self._send(requests[half:])
        [request] = requests
        if len(request.texts) == 1:
            reason = (
                f"refused: the model's replica died (or its device failed) {losses} times in a row while "
                "embedding it (the input crashes the model server)"
            )
            return [ModelError(reason, index=0)]
        half = len(request.texts) // 2
        [left] = await self._send([EmbedRequest(request.texts[:half], request.options)])
        [right] = await self._send([EmbedRequest(request.texts[half:], request.options)])
        if isinstance(left, Exception):
            return [left]
        if isinstance(right, Exception):
            return [right.after(half) if isinstance(right, InputFault) else right]
        return [EmbedResult.joined([left, right])]


def _replica_lost(error: BaseException) -> bool:
    """The replica died with the call on it, or its device failed for good (it is being replaced)."""
    return isinstance(error, RayActorError) or isinstance(original_error(error), DeviceFault)


def _lost_how(error: BaseException) -> str:
    cause = original_error(error)
    return f"DeviceFault: {cause}" if isinstance(cause, DeviceFault) else type(error).__name__


class CachedModel:
    """A model behind this router replica's embedding cache for it: the inputs the cache holds are
    answered from it and only the others are sent to the model (see ``deployments/ingress/cache.py``)."""

    def __init__(self, inner: ModelClient, name: str, cache: EmbeddingCache):
        self.inner = inner
        self.deployment = inner.deployment
        self.name = name
        self.cache = cache
        self.metrics = CacheMetrics(name)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        cache, o, texts = self.cache, request.options, request.texts
        before = (cache.stats.hits, cache.stats.misses, cache.stats.evictions)
        keys = [cache_key(self.name, o.prompt, o.normalize, o.truncate, t) for t in texts]
        lookup = look_up(cache, keys, texts)
        computed = None
        if not lookup.complete:
            try:
                computed = await self.inner.embed(EmbedRequest(lookup.missing, o))
            except (ClientError, ModelError) as error:  # placed among the missing texts: re-place it
                if error.index is None:
                    raise
                raise error.at(lookup.where[error.index][0]) from None
        if computed is None:  # all from the cache: no model time
            vectors, counts = assemble(cache, lookup, None, None)
            result = EmbedResult(vectors, counts)
        else:
            vectors, counts = assemble(cache, lookup, computed.vectors, computed.token_counts)
            result = EmbedResult(vectors, counts, computed.queue_seconds, computed.compute_seconds)
        s = cache.stats
        self.metrics.record(s.hits - before[0], s.misses - before[1], s.evictions - before[2], s.bytes)
        return result

    async def info(self) -> dict[str, Any] | None:
        return await self.inner.info()

    def known_info(self) -> dict[str, Any] | None:
        return self.inner.known_info()

    async def ping(self) -> bool:
        return await self.inner.ping()


async def health_of(model: ModelClient, timeout_s: float) -> str:
    """ "ok" once the model embeds a real text through its batching path within ``timeout_s``; otherwise
    what went wrong and Serve's own word on the model's deployment."""
    try:
        if await asyncio.wait_for(model.ping(), timeout_s):
            return "ok"
        problem = "wrong output shape"
    except asyncio.TimeoutError:
        problem = f"no answer within {timeout_s:.0f} s"
    except Exception as exc:  # noqa: BLE001 - health reports any failure, it never raises
        problem = f"{type(exc).__name__}: {exc}"[:300]
    return f"{problem}; {deployment_status(model.deployment)}"


def deployment_status(deployment: str | None) -> str:
    """Serve's own word on a deployment of this app (None: this replica's own), for example replicas
    waiting for resources."""
    try:
        context = serve.get_replica_context()
        app = serve.status().applications[context.app_name]
        status = app.deployments[deployment or context.deployment]
        return f"deployment {status.status.value}: {status.message or 'no message'}"[:600]
    except Exception as exc:  # noqa: BLE001 - health must answer even if status cannot be read
        return f"deployment status unavailable ({type(exc).__name__})"


async def _awaited(response: Any) -> Any:
    return await response
