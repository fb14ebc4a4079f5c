"""The ingress deployment: OpenAI-style HTTP API and a Python handle API over the model deployments.

It resolves model names and aliases from the models config, checks each request before any model work,
and hands it to the model's client (``deployments/ingress/model_clients.py``: the model deployment by handle,
or, for ``router.in_process_model``, the ``ModelServer`` this replica runs itself, either behind the model's
cache). Admission, body limits and hang-ups are ``admission.py`` and ``http_request.py``. Client mistakes
become 4xx OpenAI-style errors; anything else is a server fault (5xx) and is logged.
"""

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from deployments.config import ModelsConfig
from deployments.ingress.admission import Admission, Overloaded
from deployments.ingress.auth import ApiKeys, exposure_problem
from deployments.ingress.cache import EmbeddingCache
from deployments.ingress.http_request import (
    CLIENT_CLOSED,
    error_response,
    failure_response,
    overloaded,
    read_body,
    unless_client_leaves,
)
from deployments.ingress.model_clients import (
    CachedModel,
    LocalModel,
    ModelClient,
    RemoteModel,
    deployment_status,
    health_of,
)
from deployments.ingress.openai_api import (
    check_dimensions,
    model_card,
    parse_embeddings_request,
    render_embeddings,
    shorten,
    validate_texts,
)
from deployments.metrics import RouterMetrics
from deployments.protocol.errors import ShuttingDown, model_not_found, quiet_client_errors
from deployments.protocol.options import EmbedOptions, EmbedRequest, EmbedResult

logger = logging.getLogger("ray.serve")
api = FastAPI(title="GraphRAG embeddings", docs_url=None, redoc_url=None)
HEALTH_TIMEOUT_S = 10.0
DRAIN_SETTLE_S = 0.5
ROUTES = "POST /v1/embeddings, GET|HEAD /v1/models, GET|HEAD /health"


@api.exception_handler(HTTPException)
async def _route_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the OpenAI shape, keeping their headers."""
    path, code = request.url.path, f"http_{exc.status_code}"  # a status the table has no code for
    message = str(exc.detail)
    if exc.status_code == 404:
        message, code = f"no route {request.method} {path}; routes: {ROUTES}", "not_found"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on {path}; allowed: {allowed}"
        code = "method_not_allowed"
    response = error_response(code, message, status=exc.status_code)
    response.headers.update(exc.headers or {})
    return response


@api.exception_handler(Exception)
async def _server_fault(request: Request, exc: Exception) -> Response:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return error_response("internal_error", f"internal error: {type(exc).__name__}")


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
        local = self.config.in_process_entry
        local_name = local.name if local is not None else None
        self.in_process = LocalModel(local.model_dump(), config_dir) if local is not None else None
        self.models_by_name: dict[str, ModelClient] = {}
        for e in self.config.models:
            model = (
                self.in_process
                if e.name == local_name
                else RemoteModel(e.name, embedders[e.name], e.max_replicas)
            )
            if e.cache is not None and e.cache.max_mb is not None:
                model = CachedModel(model, e.name, EmbeddingCache(int(e.cache.max_mb * 2**20)))
            self.models_by_name[e.name] = model

    # ---- shared by HTTP and handle callers -------------------------------------------------------
    def _resolve(self, model: str | None) -> str:
        name = self.config.default_model if model is None else model
        if name not in self.names:
            raise model_not_found(name, sorted(self.names))
        return self.names[name]

    async def _embed(self, texts: list[str], model: str, options: EmbedOptions) -> EmbedResult:
        """The model call's result, within the request timeout."""
        call = self.models_by_name[model].embed(EmbedRequest(texts, options))
        return await asyncio.wait_for(call, self.config.router.request_timeout_s)

    # ---- HTTP -----------------------------------------------------------------------------------
    def _refused(self, request: Request) -> Response | None:
        """A 401 when API keys are set and the request does not carry one of them (no hint which part)."""
        if self.keys is None or self.keys.accepts(request.headers.get("authorization")):
            return None
        self.metrics.auth_failure(request.url.path)
        response = error_response(
            "invalid_api_key", "invalid or missing API key: send Authorization: Bearer <key>"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @api.post("/v1/embeddings")
    async def create_embeddings(self, request: Request) -> Response:
        resolved: dict[str, str] = {}
        response = self._refused(request)
        if response is None:
            try:
                async with self.admission.place():
                    response = await self._embeddings(request, resolved)
            except ShuttingDown as stopping:
                response = overloaded(self.config.router.retry_after_s, str(stopping), "shutting_down")
            except Overloaded:
                response = overloaded(
                    self.config.router.retry_after_s,
                    f"the service is overloaded ({self.admission.inside} requests on this router replica: "
                    f"{self.admission.at_work} at work, the others sending their body or waiting); "
                    "retry later",
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
            body = await read_body(request, self.config.max_body_bytes, self.config.router.body_timeout_s)
            async with self.admission.slot() as waited_s:
                return await self._answer(request, body, resolved, waited_s)
        except Exception as exc:  # noqa: BLE001 - every failure is answered: never a hang, never a bare 500
            return failure_response(exc, self.config.router.retry_after_s, logger, resolved.get("model"))

    async def _answer(
        self, request: Request, body: bytes, resolved: dict[str, str], waited_s: float
    ) -> Response:
        """The embeddings of a request at work; its errors are rendered by ``_embeddings``."""
        req = parse_embeddings_request(body, self.config.router.max_inputs_per_request)
        model = resolved["model"] = self._resolve(req.model)
        info = self.models_by_name[model].known_info()  # known once a replica answered; never waited for
        entry = self.config.entry(model)
        if req.dimensions is not None and info is not None:  # refused before any model work
            check_dimensions(req.dimensions, info["dimension"], model, entry.matryoshka)
        options = entry.request_options(req.prompt_name, req.normalize, req.truncate)
        result = await unless_client_leaves(request, self._embed(req.texts, model, options))
        vectors = result.vectors
        if req.dimensions is not None:
            native = vectors.shape[1]
            check_dimensions(req.dimensions, native, model, entry.matryoshka)
            vectors = shorten(vectors, req.dimensions, native, options.normalize)
        return Response(
            render_embeddings(vectors, model, int(result.token_counts.sum()), req.encoding_format),
            media_type="application/json",
            headers={  # where the time went (Serve adds x-request-id, echoed or generated)
                "x-queue-time-ms": f"{(waited_s + result.queue_seconds) * 1e3:.1f}",
                "x-inference-time-ms": f"{result.compute_seconds * 1e3:.1f}",
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
        if self.admission.draining:  # a load balancer in front stops sending here
            return JSONResponse({"status": "shutting down"}, 503)

        names = [e.name for e in self.config.models]
        probes = (health_of(self.models_by_name[n], HEALTH_TIMEOUT_S) for n in names)
        states = dict(zip(names, await asyncio.gather(*probes), strict=True))
        healthy = all(s == "ok" for s in states.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "models": states}, 200 if healthy else 503
        )

    # ---- Python handle API (in-cluster callers such as kt_gen) ----------------------------------
    async def embed(
        self,
        texts: str | list[str],
        model: str | None = None,
        prompt_name: str | None = None,
        normalize: bool | None = None,
    ) -> np.ndarray:
        """float32 [n, dim] for a list (a str counts as a list of one); raises ClientError on bad input,
        ShuttingDown (to send again) once the replica drains."""
        async with self.admission.call():
            batch = validate_texts(texts, self.config.router.max_inputs_per_request)
            name = self._resolve(model)
            options = self.config.entry(name).request_options(prompt_name, normalize)
            return (await self._embed(batch, name, options)).vectors

    async def drain(self) -> dict[str, Any]:
        """Before the service stops (``deployments/tools/serve_run.py``): refuse every new request and call,
        answer those already in (at most ``router.drain_timeout_s``); this replica's id and how many were
        still in when it stopped waiting."""
        left = await self.admission.drain(self.config.router.drain_timeout_s)
        # The last answers leave the handler before their bytes leave the replica's HTTP server.
        await asyncio.sleep(DRAIN_SETTLE_S)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "left": left}

    async def models(self) -> list[dict[str, Any]]:
        """The served models as ``/v1/models`` lists them (``openai_api.model_card``)."""
        infos = await asyncio.gather(*(self.models_by_name[e.name].info() for e in self.config.models))
        return [
            model_card(
                e,
                info,
                self.config,
                "" if info else deployment_status(self.models_by_name[e.name].deployment),
            )
            for e, info in zip(self.config.models, infos, strict=True)
        ]

    def stats(self) -> dict[str, float | int]:
        """The in-process model's scheduler counters (see ``Scheduler.stats``); empty without one."""
        return self.in_process.stats() if self.in_process is not None else {}

    def check_health(self) -> None:
        """Serve's health check: fails once the in-process model's device failed for good, so Serve
        replaces this replica (``ModelServer.check_health``)."""
        if self.in_process is not None:
            self.in_process.server.check_health()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Per cached model: hits, misses, evictions, bytes and entries of this replica's cache."""
        return {
            name: vars(model.cache.stats).copy()
            for name, model in self.models_by_name.items()
            if isinstance(model, CachedModel)
        }

    def __del__(self) -> None:
        in_process = getattr(self, "in_process", None)
        if in_process is not None:
            in_process.close()
