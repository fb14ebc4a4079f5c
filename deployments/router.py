"""The ingress deployment: OpenAI-style HTTP API and a Python handle API over the model deployments.

It resolves model names and aliases from the models config, checks each request before any model work,
and calls the model's ``Embedder`` by handle, or, for ``router.in_process_model``, the ``ModelServer``
it runs itself (no hop: the lean path for a one-machine service). Client mistakes become 4xx
OpenAI-style errors; anything else is a server fault (5xx) and is logged.
"""

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from deployments.admission import Admission, Overloaded
from deployments.auth import ApiKeys, exposure_problem
from deployments.cache import EmbeddingCache, cache_key, fill, look_up
from deployments.coalescer import Coalescer
from deployments.config import ModelsConfig
from deployments.embedder import ModelServer
from deployments.errors import ClientError, ModelError, model_not_found, original_error, quiet_client_errors
from deployments.metrics import CacheMetrics, RouterMetrics
from deployments.openai_api import (
    check_dimensions,
    parse_embeddings_request,
    render_embeddings,
    render_error,
    shorten,
    validate_texts,
)

T = TypeVar("T")
logger = logging.getLogger("ray.serve")
api = FastAPI(title="GraphRAG embeddings", docs_url=None, redoc_url=None)
HEALTH_TIMEOUT_S = 10.0
# How long /v1/models (and so a client's constructor) waits for a model's replica before listing it pending.
INFO_TIMEOUT_S = 3.0
# Replicas a call may take down in a row before it is split to find the input that does.
REPLICA_LOSSES_BEFORE_SPLIT = 2


def _error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> Response:
    return Response(
        render_error(message, status, param, code), status_code=status, media_type="application/json"
    )


# What a replica's info() says computes its passes, repeated in /v1/models.
SERVING_KEYS = ("runtime", "precision", "fidelity_worst_cosine", "serving_note", "allocator")
ROUTES = "POST /v1/embeddings, GET|HEAD /v1/models, GET|HEAD /health"


@api.exception_handler(HTTPException)
async def _route_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the OpenAI shape, keeping their headers."""
    path, code = request.url.path, None
    message = str(exc.detail)
    if exc.status_code == 404:
        message, code = f"no route {request.method} {path}; routes: {ROUTES}", "not_found"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on {path}; allowed: {allowed}"
        code = "method_not_allowed"
    response = _error_response(message, exc.status_code, code=code)
    response.headers.update(exc.headers or {})
    return response


@api.exception_handler(Exception)
async def _server_fault(request: Request, exc: Exception) -> Response:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return _error_response(f"internal error: {type(exc).__name__}", 500, code="internal_error")


async def _awaited(response: Any) -> Any:
    return await response


class ClientLeft(Exception):
    """The HTTP client closed its connection before its answer was ready."""


# nginx's "client closed request": the status a hang-up is counted under (no client ever receives it).
CLIENT_CLOSED = 499


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientLeft as soon as the client disconnects, with ``work`` cancelled (so the
    model drops the request's queued inputs). Behind Serve's proxy the proxy cancels a request whose
    client left; behind HAProxy (direct ingress) nothing else does: the replica's own HTTP server only
    reports the disconnect, as the next ASGI message once the body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # the work ends with the request: its answer, its client leaving, or its own cancellation
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientLeft


async def _disconnect(request: Request) -> None:
    """Returns when the client has disconnected; never, if the server cannot tell."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - no way to watch this connection: leave the work alone
        await asyncio.Event().wait()


def _body_too_large(size: int, limit: int, at_least: bool = False) -> ClientError:
    return ClientError(
        f"request body of {'more than ' if at_least else ''}{size} bytes exceeds the limit of {limit} bytes "
        "(router.max_body_mb); send fewer or shorter inputs per request",
        413,
        code="body_too_large",
    )


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxy listens on (None when it cannot be read)."""
    try:
        return serve.context._get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - no client here: leave the decision to the config
        return None


@serve.deployment
@serve.ingress(api)
class EmbeddingRouter:
    def __init__(
        self,
        config: dict[str, Any],
        embedders: dict[str, DeploymentHandle],
        config_dir: str | None = None,
    ):
        self.config = ModelsConfig.model_validate(config)
        options = self.config.router
        self.keys = ApiKeys.from_env(options.api_keys_env) if options.api_keys_env else None
        problem = exposure_problem(_proxy_host(), self.keys is not None, options.allow_unauthenticated)
        if problem:
            raise RuntimeError(problem)
        self.metrics = RouterMetrics()
        self.admission = Admission(options.max_ongoing_requests, options.max_queued_requests)
        quiet_client_errors(logger)
        self.names = self.config.name_table()
        self.embedders = embedders
        local = self.config.in_process_entry
        self.local = ModelServer(local.model_dump(), config_dir) if local is not None else None
        self._info: dict[str, dict[str, Any]] = {}
        self.caches = {
            e.name: (EmbeddingCache(int(e.cache.max_mb * 2**20)), CacheMetrics(e.name))
            for e in self.config.models
            if e.cache is not None
        }
        self.coalescer = Coalescer(
            self._send, max_in_flight=lambda key: 2 * self.config.entry(key[0]).max_replicas
        )

    # ---- shared by HTTP and handle callers -------------------------------------------------------
    def _resolve(self, model: str | None) -> str:
        name = self.config.default_model if model is None else model
        if name not in self.names:
            raise model_not_found(name, sorted(self.names))
        return self.names[name]

    def _check_prompt(self, model: str, prompt_name: str | None) -> None:
        prompts = self.config.entry(model).prompts
        if prompt_name is not None and prompt_name not in prompts:
            raise ClientError(
                f"prompt_name {prompt_name!r} is not defined for model {model!r}; "
                f"defined: {', '.join(sorted(prompts)) or 'none'}",
                400,
                "prompt_name",
            )

    async def _model_info(self, model: str) -> dict[str, Any] | None:
        """A replica's ``info()`` (cached once known); None while no replica answers within seconds, for
        example while the model's replicas wait for a node of their class."""
        if self._is_local(model):
            return self._known_info(model)
        if model not in self._info:
            response = self.embedders[model].info.remote()
            try:
                self._info[model] = await asyncio.wait_for(_awaited(response), INFO_TIMEOUT_S)
            except asyncio.TimeoutError:
                response.cancel()
                return None
        return self._info[model]

    def _is_local(self, model: str) -> bool:
        """Whether this replica runs ``model`` itself (``router.in_process_model``)."""
        return self.local is not None and model == self.local.entry.name

    def _known_info(self, model: str) -> dict[str, Any] | None:
        """A model's ``info()`` if already known (the in-process model's is known from the start)."""
        if model not in self._info and self._is_local(model):
            self._info[model] = self.local.info()
        return self._info.get(model)

    async def _send(self, key: tuple, texts: list[str], first: int = 0) -> tuple:
        """One call to the model deployment: (vectors, tokens per input, (s queued, s computing)).

        Embedding is idempotent, so a call lost with its replica (killed, crashed, node gone) is sent
        again. A call that loses ``REPLICA_LOSSES_BEFORE_SPLIT`` replicas in a row is split in halves, each
        sent on its own, down to the one input that takes replicas down, which is refused (ModelError naming
        it by its place in the call, offset by ``first``) while the others are answered. The request
        timeout bounds the whole."""
        model, prompt_name, normalize, truncate = key
        losses = 0
        for attempt in itertools.count():
            response = self.embedders[model].embed.remote(texts, prompt_name, normalize, truncate)
            try:
                return await response
            except asyncio.CancelledError:  # every caller of this call left: the replica drops its rows
                response.cancel()
                raise
            except RayActorError as exc:  # the replica died with the call on it
                losses += 1
                logger.warning(
                    "model %s: replica lost (%s) with a call of %d inputs on it (%d in a row)",
                    model, type(exc).__name__, len(texts), losses,
                )  # fmt: skip
                if losses >= REPLICA_LOSSES_BEFORE_SPLIT:
                    return await self._send_split(key, texts, first, losses)
            except ReplicaUnavailableError:  # no replica to take it yet (starting, replacing a lost one)
                pass
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    async def _send_split(self, key: tuple, texts: list[str], first: int, losses: int) -> tuple:
        if len(texts) == 1:
            raise ModelError(
                f"input[{first}] was refused: the model's replica died {losses} times in a row while "
                "embedding it (the input crashes the model server)"
            )
        half = len(texts) // 2
        left = await self._send(key, texts[:half], first)
        right = await self._send(key, texts[half:], first + half)
        timing = tuple(a + b for a, b in zip(left[2], right[2], strict=True))
        return np.concatenate([left[0], right[0]]), np.concatenate([left[1], right[1]]), timing

    async def _embed(
        self, texts: list[str], model: str, prompt_name: str | None, normalize: bool | None, truncate: bool
    ) -> tuple[np.ndarray, int, tuple[float, float]]:
        """Vectors, total tokens, and the model call's (seconds queued, seconds computing); inputs the
        model's cache holds are answered from it and only the rest is computed."""
        self._check_prompt(model, prompt_name)
        if model not in self.caches:
            vectors, tokens, timing = await self._compute(texts, model, prompt_name, normalize, truncate)
            return vectors, int(tokens.sum()), timing
        cache, metrics = self.caches[model]
        entry = self.config.entry(model)
        prompt = entry.prompt_text(prompt_name)
        norm = entry.normalize if normalize is None else normalize
        before = (cache.stats.hits, cache.stats.misses, cache.stats.evictions)
        lookup = look_up(cache, [cache_key(model, prompt, norm, truncate, t) for t in texts], texts)
        computed, tokens, timing = None, None, (0.0, 0.0)
        if not lookup.complete:
            try:
                computed, tokens, timing = await self._compute(
                    lookup.missing, model, prompt_name, normalize, truncate
                )
            except (ClientError, ModelError):
                if len(lookup.missing) == len(texts):
                    raise
                # The error names an input by its place in the call: ask with the whole request instead.
                vectors, tokens, timing = await self._compute(texts, model, prompt_name, normalize, truncate)
                return vectors, int(tokens.sum()), timing
        vectors, counts = fill(cache, lookup, computed, tokens)
        s = cache.stats
        metrics.record(s.hits - before[0], s.misses - before[1], s.evictions - before[2], s.bytes)
        return vectors, int(counts.sum()), timing

    async def _compute(
        self, texts: list[str], model: str, prompt_name: str | None, normalize: bool | None, truncate: bool
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """Vectors, tokens per input and the model call's timing. Requests that may be refused
        (truncate: false) travel alone."""
        key = (model, prompt_name, normalize, truncate)
        if self._is_local(model):
            call = self.local.embed(texts, prompt_name, normalize, truncate)
        elif truncate:
            call = self.coalescer.submit(key, texts)
        else:
            call = self._send(key, texts)
        return await asyncio.wait_for(call, self.config.router.request_timeout_s)

    # ---- HTTP -----------------------------------------------------------------------------------
    def _refused(self, request: Request) -> Response | None:
        """A 401 when API keys are set and the request does not carry one of them (no hint which part)."""
        if self.keys is None or self.keys.accepts(request.headers.get("authorization")):
            return None
        self.metrics.auth_failure(request.url.path)
        response = _error_response(
            "invalid or missing API key: send Authorization: Bearer <key>", 401, code="invalid_api_key"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _read_body_in_time(self, request: Request) -> bytes:
        timeout = self.config.router.body_timeout_s
        try:
            return await asyncio.wait_for(self._read_body(request), timeout)
        except (ClientDisconnect, TaskCancelledError):  # hung up mid-body: the client's doing, not a fault
            # (behind Serve's proxy the body comes through the proxy's call, cancelled when its client left)
            raise ClientLeft from None
        except asyncio.TimeoutError:
            raise ClientError(
                f"the request body was not received within {timeout:g} s (router.body_timeout_s)",
                408,
                code="body_timeout",
            ) from None

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to pass the limit: from Content-Length
        before reading anything, else while a chunked body streams in."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _body_too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _body_too_large(size, limit, at_least=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def _overloaded(self, message: str) -> Response:
        response = _error_response(message, 503, code="overloaded")
        response.headers["Retry-After"] = str(max(1, math.ceil(self.config.router.retry_after_s)))
        return response

    @api.post("/v1/embeddings")
    async def create_embeddings(self, request: Request) -> Response:
        resolved: dict[str, str] = {}
        response = self._refused(request)
        if response is None:
            try:
                async with self.admission.place():
                    response = await self._embeddings(request, resolved)
            except Overloaded:
                response = self._overloaded(
                    f"the service is overloaded ({self.admission.inside} requests on this router replica: "
                    f"{self.admission.at_work} at work, the others sending their body or waiting); "
                    "retry later"
                )
            except asyncio.CancelledError:  # Serve's proxy cancels a request whose client left
                self.metrics.request(resolved.get("model"), "/v1/embeddings", CLIENT_CLOSED)
                raise
        self.metrics.request(resolved.get("model"), "/v1/embeddings", response.status_code)
        return response

    async def _embeddings(self, request: Request, resolved: dict[str, str]) -> Response:
        """The answer to a request that holds a place: its body is read first, then it takes a slot of
        work, so a slow sender never holds one (its wait for the slot counts as queueing)."""
        try:
            body = await self._read_body_in_time(request)
            async with self.admission.slot() as waited_s:
                return await self._answer(request, body, resolved, waited_s)
        except ClientError as err:
            return _error_response(err.message, err.status, err.param, err.code)
        except ClientLeft:  # nobody reads this answer; its status only counts the hang-up in the metrics
            return _error_response("the client closed the connection", CLIENT_CLOSED, code="client_closed")
        except BackPressureError:
            return self._overloaded("the model is overloaded; retry later")
        except asyncio.TimeoutError:
            return _error_response("the model did not answer in time", 504, code="timeout")
        except ModelError as err:  # deterministic: the same input fails again; logged, not to be retried
            logger.error("model %s failed: %s", resolved.get("model"), original_error(err))
            return _error_response(str(original_error(err)), 500, "input", "model_error")
        except Exception as exc:  # noqa: BLE001 - a server fault: say so, log it, never hang
            logger.exception("embedding request failed")
            return _error_response(f"internal error while embedding: {type(exc).__name__}", 500)

    async def _answer(
        self, request: Request, body: bytes, resolved: dict[str, str], waited_s: float
    ) -> Response:
        """The embeddings of a request at work; its errors are rendered by ``_embeddings``."""
        req = parse_embeddings_request(body, self.config.router.max_inputs_per_request)
        model = resolved["model"] = self._resolve(req.model)
        info = self._known_info(model)  # known once a replica answered; never waited for here
        entry = self.config.entry(model)
        if req.dimensions is not None and info is not None:  # refused before any model work
            check_dimensions(req.dimensions, info["dimension"], model, entry.matryoshka)
        vectors, tokens, (queued_s, computing_s) = await _unless_client_leaves(
            request, self._embed(req.texts, model, req.prompt_name, req.normalize, req.truncate)
        )
        if req.dimensions is not None:
            native = vectors.shape[1]
            check_dimensions(req.dimensions, native, model, entry.matryoshka)
            normalize = entry.normalize if req.normalize is None else req.normalize
            vectors = shorten(vectors, req.dimensions, native, normalize)
        return Response(
            render_embeddings(vectors, model, tokens, req.encoding_format),
            media_type="application/json",
            headers={  # where the time went (Serve adds x-request-id, echoed or generated)
                "x-queue-time-ms": f"{(waited_s + queued_s) * 1e3:.1f}",
                "x-inference-time-ms": f"{computing_s * 1e3:.1f}",
            },
        )

    @api.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models(self, request: Request) -> Response:
        if refused := self._refused(request):
            self.metrics.request(None, "/v1/models", refused.status_code)
            return refused
        self.metrics.request(None, "/v1/models", 200)
        return JSONResponse({"object": "list", "data": await self.models()})

    @api.api_route("/health", methods=["GET", "HEAD"])
    async def health(self, request: Request) -> Response:
        if self.config.router.health_requires_key and (refused := self._refused(request)):
            return refused

        async def probe(name: str) -> str:
            try:
                ping = self.local.ping() if name not in self.embedders else self.embedders[name].ping.remote()
                ok = await asyncio.wait_for(_awaited(ping), HEALTH_TIMEOUT_S)
                return "ok" if ok else "wrong output shape"
            except asyncio.TimeoutError:
                return f"no answer within {HEALTH_TIMEOUT_S:.0f} s"
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {exc}"[:300]

        names = [e.name for e in self.config.models]
        states = dict(zip(names, await asyncio.gather(*(probe(n) for n in names)), strict=True))
        healthy = all(s == "ok" for s in states.values())
        if not healthy:
            states = {n: s if s == "ok" else f"{s}; {self._deployment_status(n)}" for n, s in states.items()}
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "models": states}, 200 if healthy else 503
        )

    def _deployment_status(self, name: str) -> str:
        """Serve's own word on a model's deployment (for example: replicas waiting for resources)."""
        try:
            context = serve.get_replica_context()
            app = serve.status().applications[context.app_name]
            deployment = app.deployments[name if name in self.embedders else context.deployment]
            return f"deployment {deployment.status.value}: {deployment.message or 'no message'}"[:600]
        except Exception as exc:  # noqa: BLE001 - health must answer even if status cannot be read
            return f"deployment status unavailable ({type(exc).__name__})"

    # ---- Python handle API (in-cluster callers such as kt_gen) ----------------------------------
    async def embed(
        self,
        texts: str | list[str],
        model: str | None = None,
        prompt_name: str | None = None,
        normalize: bool | None = None,
    ) -> np.ndarray:
        """float32 [n, dim] for a list (a str counts as a list of one); raises ClientError on bad input."""
        batch = validate_texts(texts, self.config.router.max_inputs_per_request)
        vectors, _, _ = await self._embed(batch, self._resolve(model), prompt_name, normalize, True)
        return vectors

    async def models(self) -> list[dict[str, Any]]:
        """The served models: names, aliases, prompts (name -> text), dimension, limits and how many
        replicas may serve each (clients size and parallelise their requests from these)."""
        infos = await asyncio.gather(*(self._model_info(e.name) for e in self.config.models))
        return [
            {
                "id": e.name,
                "object": "model",
                "created": 0,
                "owned_by": "graphrag-embeddings",
                "aliases": list(e.aliases),
                "prompts": dict(e.prompts),
                "default_prompt": e.default_prompt,
                "dimension": info["dimension"] if info else None,
                "state": "ready" if info else f"pending: {self._deployment_status(e.name)}",
                # What computes the vectors (one replica's report; all replicas of a model load alike).
                **{k: info.get(k) if info else None for k in SERVING_KEYS},
                "max_seq_length": e.max_seq_length,
                "max_inputs_per_request": self.config.router.max_inputs_per_request,
                "max_body_bytes": self.config.max_body_bytes,
                "max_replicas": e.max_replicas,
                "default": e.name == self.names[self.config.default_model],
            }
            for e, info in zip(self.config.models, infos, strict=True)
        ]

    def stats(self) -> dict[str, float | int]:
        """The in-process model's scheduler counters (see ``Scheduler.stats``); empty without one."""
        return self.local.stats() if self.local is not None else {}

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Per cached model: hits, misses, evictions, bytes and entries of this replica's cache."""
        return {name: vars(cache.stats).copy() for name, (cache, _) in self.caches.items()}

    def __del__(self) -> None:
        local = getattr(self, "local", None)
        if local is not None:
            local.close()
