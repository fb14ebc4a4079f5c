"""The service's HTTP contract that its clients share: every error code with its status, its OpenAI
``type`` and whether to retry it (``ERRORS``), the error a caller's mistake raises (``ClientError``), and the
rule every input must meet (``check_items``). The server and the client both ship this one module, so a
status is chosen nowhere else: the server raises or renders a code (``deployments/ingress/http_request.py``),
the clients (``clients/http.py``, ``clients/serve.py``) read a code back through the same table.
docs/api.md lists the table (``tests/test_docs.py`` keeps the two equal).

A ``ClientError`` is the caller's mistake (4xx, nothing retried); anything else raised while serving is a
server fault (5xx). Errors keep their arguments in ``args`` so they pickle across Ray unchanged. A
``ClientError`` is a ``ValueError``, as sentence-transformers raises for a bad input, so pipeline code that
catches ``ValueError`` behaves the same in process and through the service.

Standard library only: the client installs with numpy and httpx and nothing else.
"""

from __future__ import annotations

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
    "shutting_down": ErrorKind(
        503,
        "server_error",
        retry=True,
        meaning="the service is stopping: the request was not started (with Retry-After)",
    ),
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


class InputFault:
    """What an error about one input carries: the input's place in its request (``index``, None when the
    error is about the request as a whole) beside the reason. The message names the input from the index,
    so a layer that sent a subset of a request (the cache sends only what it lacks) re-places the error
    with ``at`` and the message follows."""

    reason: str
    index: int | None

    def after(self, offset: int) -> InputFault:
        """The same error in a list that holds the caller's list from ``offset`` on (a chunk, a half, one
        of the requests a long list was cut into): the input it names, re-placed; as is when it names
        none. ``at`` is each error class's own copy with another index."""
        return self if self.index is None else self.at(offset + self.index)  # type: ignore[attr-defined]

    @property
    def message(self) -> str:
        return self.reason if self.index is None else f"input[{self.index}]: {self.reason}"

    def __str__(self) -> str:
        return self.message


class ClientError(InputFault, ValueError):
    """The request is wrong: ``code`` is its entry in ``ERRORS``, ``param`` the request field at fault,
    ``index`` the failing input's place in the request's ``input`` list. ``status`` is given only for a
    code the table does not know (an error read back from another server)."""

    def __init__(
        self,
        reason: str,
        code: str = "invalid_request",
        param: str | None = None,
        status: int | None = None,
        index: int | None = None,
    ):
        super().__init__(reason, code, param, status, index)
        self.reason = reason
        self.code = code
        self.param = param
        self.status = status if status is not None else error_kind(code, 400).status
        self.index = index

    def at(self, index: int) -> ClientError:
        """The same error about the input at ``index`` of the caller's request."""
        return ClientError(self.reason, self.code, self.param, self.status, index)


def model_not_found(model: str, available: list[str]) -> ClientError:
    return ClientError(
        f"model {model!r} does not exist; available: {', '.join(available)}", "model_not_found", "model"
    )


def check_items(value: list) -> None:
    """Every item a string (token arrays named as such); the clients run it on a whole list too."""
    if value and (
        all(isinstance(t, int) for t in value)
        or all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in value)
    ):
        raise ClientError(
            "token arrays are not supported as 'input': token ids mean nothing to these models; send text "
            "(strings). LangChain's OpenAIEmbeddings sends token ids unless it is built with "
            "check_embedding_ctx_length=False",
            "token_ids_not_supported",
            "input",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ClientError(f"must be a string, got {type(item).__name__}", param="input", index=i)
