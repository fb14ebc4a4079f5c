"""Errors that cross the Ray boundary and become HTTP statuses.

A ``ClientError`` is the caller's mistake (4xx, nothing retried); anything else raised while serving is a
server fault (5xx). They keep their arguments in ``args`` so they pickle across Ray unchanged.
"""

from __future__ import annotations


class ClientError(Exception):
    """The request is wrong; ``status`` is its HTTP status, ``param`` the request field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, status, param, code)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def __str__(self) -> str:
        return self.message


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
