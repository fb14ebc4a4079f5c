"""One model's engine: calls in, one answer per call out, the scheduler deciding every forward pass.

Plain Python around a backend, so it is tested without Ray. A call is tokenised when it arrives, on a
tokenizer thread (in chunks, so a bulk call's tokenisation does not hold up a small call's), then admitted
to the ``Scheduler``, which plans and runs passes on one model thread.
Tokenising therefore overlaps the forward pass, and neither blocks the event loop that answers health checks.

No input is too long to tokenise cheaply: at most ``8 x max_seq_length`` characters of a text are read
at first (cut at a whitespace so no word is split); only a text whose prefix did not fill
``max_seq_length`` tokens is read further, doubling up to ``64 x max_seq_length`` characters. English
runs at 4-5 characters per token, so the result is what tokenising the whole text gives; characters
past the 64x ceiling are never read. With ``truncate: false`` a text longer than the ceiling is refused.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from deployments.config import Batching
from deployments.engine.backends.base import EmbeddingBackend, EncodedText
from deployments.engine.pass_cost import measure_backend_pass_cost
from deployments.engine.scheduler import Scheduler, SchedulerObserver
from deployments.protocol.errors import ClientError, input_too_long
from deployments.protocol.options import EmbedRequest, EmbedResult

CHARS_PER_TOKEN_FIRST = 8
CHARS_PER_TOKEN_CEILING = 64
# Texts tokenised per tokenizer-thread job: a bulk call yields the thread between chunks.
TOKENIZE_CHUNK = 256


def cut_text(text: str, max_chars: int) -> str:
    """``text`` up to ``max_chars`` characters, ending at a whitespace when one is near the cut."""
    if len(text) <= max_chars:
        return text
    space = max(
        text.rfind(" ", max_chars - 64, max_chars + 1), text.rfind("\n", max_chars - 64, max_chars + 1)
    )
    return text[: space if space > 0 else max_chars]


def tokenize_capped(
    backend: EmbeddingBackend, texts: list[str], prompt: str, truncate: bool
) -> list[EncodedText]:
    """``backend.tokenize`` reading only as much of each text as ``max_seq_length`` tokens can use. A
    refused input is a ``ClientError`` whose ``index`` is its place in ``texts``."""
    limit = backend.max_seq_length
    ceiling = CHARS_PER_TOKEN_CEILING * limit
    if not truncate:
        for i, text in enumerate(texts):
            if len(text) > ceiling:
                raise ClientError(
                    f"{len(text)} characters, more than this model reads ({ceiling}, "
                    f"{CHARS_PER_TOKEN_CEILING} per token of max_seq_length {limit}), and the request asked "
                    "truncate: false",
                    "input_too_long",
                    "input",
                    index=i,
                )
    # Refusing over-long inputs: tokenise one token further, so that an input past the limit shows.
    max_length = limit if truncate else limit + 1
    cap = CHARS_PER_TOKEN_FIRST * limit
    cut = [cut_text(t, cap) for t in texts]
    items = backend.tokenize(cut, prompt, max_length)
    for i, text in enumerate(texts):  # a cut text that did not fill max_seq_length: read more of it
        wider = cap
        while len(cut[i]) < len(text) and items[i].length < limit and wider < ceiling:
            wider = min(2 * wider, ceiling)
            cut[i] = cut_text(text, wider)
            try:
                items[i] = backend.tokenize([cut[i]], prompt, max_length)[0]
            except ClientError as error:
                raise error.after(i) from None
    for i, item in enumerate(items):
        if item.length > limit:
            raise input_too_long(i, limit)
    return items


class EmbeddingEngine:
    def __init__(
        self,
        backend: EmbeddingBackend,
        batching: Batching,
        thread_init: Callable[[], None] | None = None,
        observer: SchedulerObserver | None = None,
    ):
        self.backend = backend
        if batching.forward_overhead_tokens is None:  # measured here, on this model and this machine
            cost = measure_backend_pass_cost(backend, batching)
            batching = batching.model_copy(update={"forward_overhead_tokens": cost.overhead_tokens})
            self.overhead_source = cost.describe()
        else:
            self.overhead_source = "config"
        self.batching = batching
        self.scheduler = Scheduler(backend, batching, observer=observer)
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="tokenize", initializer=thread_init)
        self._thread_init = thread_init
        self._model_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- the serving API (event loop) --------------------------------------------------------------
    async def embed(self, call: EmbedRequest) -> EmbedResult:
        """Embed one call. Cancelling the awaiting task drops the call's queued rows."""
        self._ensure_model_thread()
        loop = asyncio.get_running_loop()
        items: list[EncodedText] = []
        for start in range(0, len(call.texts), TOKENIZE_CHUNK):
            chunk = call.texts[start : start + TOKENIZE_CHUNK]
            try:
                items += await loop.run_in_executor(
                    self._tokenizer,
                    tokenize_capped,
                    self.backend,
                    chunk,
                    call.options.prompt,
                    call.options.truncate,
                )
            except ClientError as error:  # placed in the chunk: place it in the call
                raise error.after(start) from None
        future: asyncio.Future[EmbedResult] = loop.create_future()

        def on_done(result: EmbedResult | Exception) -> None:  # on the model thread
            loop.call_soon_threadsafe(_settle, future, result)

        ticket = self.scheduler.admit(items, call.options.normalize, on_done)
        try:
            return await future
        except asyncio.CancelledError:
            self.scheduler.cancel(ticket)
            raise

    def _ensure_model_thread(self) -> None:
        with self._lock:
            if self._model_thread is None:
                self._model_thread = threading.Thread(target=self._serve, name="model", daemon=True)
                self._model_thread.start()

    def _serve(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        self.scheduler.run_forever(self.batching.batch_wait_timeout_s)

    def close(self) -> None:
        self.scheduler.stop()
        self._tokenizer.shutdown(wait=False)

    def stats(self) -> dict[str, float | int]:
        return self.scheduler.stats()

    def health(self) -> None:
        """Raises once the device failed for good (see ``Scheduler.health``)."""
        self.scheduler.health()

    # ---- synchronous use (tests, benchmarks): the caller's thread runs the passes -----------------
    def run(self, calls: list[EmbedRequest]) -> list[EmbedResult | Exception]:
        """Embed every call to the end; a call's result is its vectors or the exception that sank it."""
        if self._model_thread is not None:
            raise RuntimeError("run() drives the scheduler itself; this engine already serves embed()")
        results: list[EmbedResult | Exception | None] = [None] * len(calls)
        for c, call in enumerate(calls):
            try:
                items = tokenize_capped(self.backend, call.texts, call.options.prompt, call.options.truncate)
            except Exception as exc:  # noqa: BLE001 - the caller gets it, the others carry on
                results[c] = exc
                continue

            def on_done(result: EmbedResult | Exception, c: int = c) -> None:
                results[c] = result

            self.scheduler.admit(items, call.options.normalize, on_done)
        while self.scheduler.step():
            pass
        return results  # type: ignore[return-value]


def _settle(future: asyncio.Future, result: EmbedResult | Exception) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
