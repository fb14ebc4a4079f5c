"""Errors that cross the Ray boundary and become HTTP statuses.

A ``ClientError`` is the caller's mistake (4xx, nothing retried); anything else raised while serving is a
server fault (5xx). They keep their arguments in ``args`` so they pickle across Ray unchanged. A
``ClientError`` is a ``ValueError``, as sentence-transformers raises for a bad input, so pipeline code that
catches ``ValueError`` behaves the same in process and through the service.
"""

from __future__ import annotations

import logging


class ClientError(ValueError):
    """The request is wrong; ``status`` is its HTTP status, ``param`` the request field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, status, param, code)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

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
        f"model {model!r} does not exist; available: {', '.join(available)}", 404, "model", "model_not_found"
    )


def input_too_long(index: int, tokens: int, limit: int) -> ClientError:
    return ClientError(
        f"input[{index}] has more than {limit} tokens (this model's max_seq_length) and the request asked "
        "truncate: false",
        400,
        "input",
        "input_too_long",
    )
