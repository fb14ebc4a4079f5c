"""The HTTP side of a request the router answers: its body, read within a size and a time limit, the
client that may leave while its answer is computed, and every error rendered in the OpenAI shape with the
status of its code (``deployments.protocol.errors.ERRORS``)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect

from deployments.engine.device_faults import DeviceFault
from deployments.ingress.openai_api import render_error
from deployments.protocol.errors import ERRORS, ClientError, ModelError, error_kind, original_error

T = TypeVar("T")
# nginx's "client closed request": the status a hang-up is counted under (no client ever receives it).
CLIENT_CLOSED = ERRORS["client_closed"].status


class ClientLeft(Exception):
    """The HTTP client closed its connection before its answer was ready."""


def error_response(
    code: str, message: str, param: str | None = None, status: int | None = None, index: int | None = None
) -> Response:
    """The answer for an error: ``code``'s status (``status`` only for a code the table lacks)."""
    status = error_kind(code, status or 500).status
    body = render_error(code, message, param, status, index)
    return Response(body, status_code=status, media_type="application/json")


def client_error_response(error: ClientError) -> Response:
    return error_response(error.code, error.message, error.param, error.status, error.index)


def overloaded(retry_after_s: float, message: str, code: str = "overloaded") -> Response:
    """A 503 ``overloaded`` (or another code to retry, ``shutting_down``) with ``Retry-After`` (whole
    seconds, at least 1)."""
    response = error_response(code, message)
    response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return response


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body; a 413 as soon as it is known to pass ``limit`` bytes (from Content-Length before reading
    anything, else while a chunked body streams in), a 408 when it is not all in within ``timeout_s``,
    ClientLeft when the client hangs up mid-body."""
    try:
        return await asyncio.wait_for(_read_within(request, limit), timeout_s)
    except (ClientDisconnect, TaskCancelledError):  # hung up mid-body: the client's doing, not a fault
        # (behind Serve's proxy the body comes through the proxy's call, cancelled when its client left)
        raise ClientLeft from None
    except asyncio.TimeoutError:
        raise ClientError(
            f"the request body was not received within {timeout_s:g} s (router.body_timeout_s)",
            "body_timeout",
        ) from None


async def _read_within(request: Request, limit: int) -> bytes:
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


def _body_too_large(size: int, limit: int, at_least: bool = False) -> ClientError:
    return ClientError(
        f"request body of {'more than ' if at_least else ''}{size} bytes exceeds the limit of {limit} bytes "
        "(router.max_body_mb); send fewer or shorter inputs per request",
        "body_too_large",
    )


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
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


def failure_response(
    error: BaseException, retry_after_s: float, log: logging.Logger, model: str | None
) -> Response:
    """The answer for whatever sank a request at work: the caller's mistake as raised, a client that left
    (its status only counts the hang-up), overload (503), a timeout (504), the model failing on an input
    (500 ``model_error``: logged, not to be retried) or a fault of ours (500, logged with its traceback)."""
    if isinstance(error, ClientError):
        return client_error_response(error)
    if isinstance(error, ClientLeft):
        return error_response("client_closed", "the client closed the connection")
    if isinstance(error, BackPressureError):
        return overloaded(retry_after_s, "the model is overloaded; retry later")
    if isinstance(error, asyncio.TimeoutError):
        return error_response("timeout", "the model did not answer in time")
    if isinstance(original_error(error), DeviceFault):
        log.error("model %s: %s", model, original_error(error))
        return error_response("device_fault", str(original_error(error)))
    if isinstance(error, ModelError):
        cause = original_error(error)
        log.error("model %s failed: %s", model, cause)
        return error_response("model_error", str(cause), "input", index=getattr(cause, "index", None))
    log.error("embedding request failed", exc_info=error)
    return error_response("internal_error", f"internal error while embedding: {type(error).__name__}")
