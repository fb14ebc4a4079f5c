"""The server's errors: the shared contract (``clients/contract.py``: the code table, ``ClientError``) and
what only the server raises or needs: ``ModelError`` (the model failed on an input), ``ShuttingDown`` (a
draining replica's refusal), the unwrapping of errors that crossed Ray, and the log filter that keeps
client mistakes out of the error log.
"""

from __future__ import annotations

import logging

from clients.contract import (
    ERRORS,
    RETRYABLE_STATUSES,
    ClientError,
    ErrorKind,
    InputFault,
    check_items,
    error_kind,
    model_not_found,
)

__all__ = [
    "ERRORS",
    "RETRYABLE_STATUSES",
    "ClientError",
    "ErrorKind",
    "InputFault",
    "ModelError",
    "ShuttingDown",
    "check_items",
    "error_kind",
    "input_too_long",
    "model_not_found",
    "original_error",
    "quiet_client_errors",
]


class ModelError(InputFault, RuntimeError):
    """The model failed on an input (an exception in its forward pass, non-finite output): a server fault
    (500, code ``model_error``) that would happen again, so callers must not retry it."""

    def __init__(self, reason: str, index: int | None = None):
        super().__init__(reason, index)
        self.reason = reason
        self.index = index

    def at(self, index: int) -> ModelError:
        return ModelError(self.reason, index)


class ShuttingDown(RuntimeError):
    """The replica is draining before the service stops: this call was not started (503, code
    ``shutting_down``). Embedding is idempotent, so the caller sends it again (another replica, or the
    service once restarted, answers it)."""


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


def input_too_long(index: int, limit: int) -> ClientError:
    return ClientError(
        f"more than {limit} tokens (this model's max_seq_length) and the request asked truncate: false",
        "input_too_long",
        "input",
        index=index,
    )
