"""Every error the service answers with, in one table, and the errors that cross the Ray boundary.

``ERRORS`` maps each error code to its HTTP status, its OpenAI ``type`` and whether a client should retry
it. A status is chosen nowhere else: code raises or renders a code, the routers render it
(``http_request.error_response``), and the clients (``clients/http.py``, ``clients/serve.py``) read a
code back through the same table. docs/api.md lists it (``tests/test_docs.py`` keeps the two equal).

A ``ClientError`` is the caller's mistake (4xx, nothing retried); anything else raised while serving is a
server fault (5xx). They keep their arguments in ``args`` so they pickle across Ray unchanged. A
``ClientError`` is a ``ValueError``, as sentence-transformers raises for a bad input, so pipeline code that
catches ``ValueError`` behaves the same in process and through the service.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str  # OpenAI's error "type"
    retry: bool = False  # whether the same request may succeed later
    meaning: str = ""


ERRORS: dict[str, ErrorKind] = {
    "invalid_request": ErrorKind(
        400,
        "invalid_request_error",
        meaning="malformed JSON, a field of the wrong type or value, an unknown "
        "field, an empty input list or a non-string item",
    ),  # fmt: skip
    "token_ids_not_supported": ErrorKind(
        400, "invalid_request_error", meaning="token-id arrays as input: they mean nothing to these models"
    ),
    "prompt_not_found": ErrorKind(400, "invalid_request_error", meaning="an unknown prompt_name"),
    "dimensions_not_supported": ErrorKind(
        400, "invalid_request_error", meaning="dimensions the model cannot give (see matryoshka)"
    ),
    "input_too_long": ErrorKind(
        400, "invalid_request_error", meaning="an input past max_seq_length with truncate: false"
    ),
    "nothing_to_pool": ErrorKind(
        400, "invalid_request_error", meaning="an NV-Embed instruction that leaves an input no token to pool"
    ),
    "invalid_api_key": ErrorKind(
        401, "invalid_request_error", meaning="API keys are set and the request carries none of them"
    ),
    "model_not_found": ErrorKind(404, "not_found_error", meaning="an unknown model (the message lists them)"),
    "not_found": ErrorKind(404, "not_found_error", meaning="an unknown path (the message lists the routes)"),
    "method_not_allowed": ErrorKind(
        405, "invalid_request_error", meaning="a wrong method (with an Allow header)"
    ),
    "body_timeout": ErrorKind(408, "invalid_request_error", meaning="the body not in within body_timeout_s"),
    "body_too_large": ErrorKind(413, "invalid_request_error", meaning="a body past max_body_mb"),
    "too_many_inputs": ErrorKind(413, "invalid_request_error", meaning="more than max_inputs_per_request"),
    "client_closed": ErrorKind(
        499, "invalid_request_error", meaning="the client hung up (counted in the metrics, never sent)"
    ),
    "model_error": ErrorKind(
        500, "server_error", meaning="the model failed on an input: the same request fails again"
    ),
    "internal_error": ErrorKind(500, "server_error", meaning="a fault of the service (logged)"),
    "overloaded": ErrorKind(503, "server_error", retry=True, meaning="no room now (with Retry-After)"),
    "device_fault": ErrorKind(
        503,
        "server_error",
        retry=True,
        meaning="the replica's GPU failed for good (a poisoned CUDA context); Serve replaces it",
    ),
    "timeout": ErrorKind(
        504, "server_error", retry=True, meaning="the model did not answer in request_timeout_s"
    ),
}


# For a code the table does not know (a proxy's or another server's error): overload and gateway statuses.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def error_kind(code: str | None, status: int) -> ErrorKind:
    """``code``'s entry; for a code the table does not know (another server's), one made from ``status``."""
    if code in ERRORS:
        return ERRORS[code]
    return ErrorKind(
        status, "server_error" if status >= 500 else "invalid_request_error", status in RETRYABLE_STATUSES
    )


class ClientError(ValueError):
    """The request is wrong: ``code`` is its entry in ``ERRORS``, ``param`` the request field at fault.
    ``status`` is given only for a code the table does not know (an error read back from another server)."""

    def __init__(
        self, message: str, code: str = "invalid_request", param: str | None = None, status: int | None = None
    ):
        super().__init__(message, code, param, status)
        self.message = message
        self.code = code
        self.param = param
        self.status = status if status is not None else error_kind(code, 400).status

    def __str__(self) -> str:
        return self.message


class ModelError(RuntimeError):
    """The model failed on an input (an exception in its forward pass, non-finite output): a server fault
    (500, code ``model_error``) that would happen again, so callers must not retry it."""


def original_error(error: BaseException) -> BaseException:
    """The exception a remote replica raised, without Ray's ``RayTaskError`` wrapper (and its traceback)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class ClientErrorsAreNotServerErrors(logging.Filter):
    """Serve logs every exception a replica method raises as ERROR with a traceback; a client mistake
    (raised to a handle caller) is the caller's business: one INFO line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ClientError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"client error ({error.status}): {error.message}", ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_errors(logger: logging.Logger) -> None:
    if not any(isinstance(f, ClientErrorsAreNotServerErrors) for f in logger.filters):
        logger.addFilter(ClientErrorsAreNotServerErrors())


def model_not_found(model: str, available: list[str]) -> ClientError:
    return ClientError(
        f"model {model!r} does not exist; available: {', '.join(available)}", "model_not_found", "model"
    )


def input_too_long(index: int, limit: int) -> ClientError:
    return ClientError(
        f"input[{index}] has more than {limit} tokens (this model's max_seq_length) and the request asked "
        "truncate: false",
        "input_too_long",
        "input",
    )
