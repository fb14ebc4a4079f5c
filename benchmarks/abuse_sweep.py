"""Bad input and abuse against a real local service, one table: what each case got and whether that is
what a production embedding service should answer.

    python benchmarks/abuse_sweep.py [--no-haproxy] [--client-timeout-s 30] [--body-timeout-s 10]

Starts a private service as ``make serve`` does (HAProxy in front when installed) from
``configs/models.local.yaml`` with API keys on and small router limits (8 at work + 8 waiting, so that
overload is cheap to reach), sends every case, then a normal request, and exits 1 if any case got an
answer it should not. Every refusal from our code must be a 4xx/5xx in the OpenAI error shape with a
``code``; answers from layers in front of our code (HAProxy, Ray) are marked as such.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_ingress_option, start_local_service, stop_local_service, use_haproxy  # noqa: E402
from tests.conftest import free_port  # noqa: E402

KEY = "sweep-key"
# The answer comes from the layer in front of our code (HAProxy, or Serve's proxy), in its own format.
FRONT = "front"
KEYS_ENV = "SWEEP_EMBEDDING_API_KEYS"
GOOD = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Outcome:
    status: int
    code: str  # the OpenAI error's code, "-" on success, "not-json: <body>" for another layer's answer
    ms: float
    detail: str = ""


@dataclass
class Case:
    name: str
    send: Callable[[str], Outcome]
    expected_status: int
    expected_code: str  # or FRONT; "ray": Ray's known answer, whatever its body (docs/known-issues.md)


def _classify(status: int, body: bytes, t0: float) -> Outcome:
    """An answer as the table shows it: our OpenAI error's code, or the start of another layer's body."""
    ms = (time.perf_counter() - t0) * 1e3
    if status < 400:
        return Outcome(status, "-", ms)
    try:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"]
        return Outcome(status, str(error.get("code")), ms)
    except Exception:  # noqa: BLE001 - not our JSON error: say whose answer it was
        return Outcome(status, f"not-json: {body[:40]!r}", ms)


def _outcome(resp: httpx.Response, t0: float) -> Outcome:
    return _classify(resp.status_code, resp.content, t0)


CLIENT = httpx.Client()  # one connection pool, as a real client keeps: "ms" is the service's time


def http(method: str, path: str, headers: dict | None = None, timeout: float = 60, **kwargs) -> Callable:
    def send(url: str) -> Outcome:
        t0 = time.perf_counter()
        resp = CLIENT.request(method, url + path, headers=headers, timeout=timeout, **kwargs)
        return _outcome(resp, t0)

    return send


def post(body: object = None, headers: dict | None = None, **kwargs) -> Callable:
    """POST /v1/embeddings with the key; ``body`` as JSON, or ``content=`` raw bytes."""
    if body is not None:
        kwargs["json"] = body
    return http("POST", "/v1/embeddings", {**GOOD, **(headers or {})}, **kwargs)


def raw(request: bytes, read_timeout: float = 60) -> Callable:
    """Bytes written to a socket as they are (an HTTP/1.1 client would refuse to send most of these);
    the answer's status and body (as far as its Content-Length says)."""

    def send(url: str) -> Outcome:
        host, port = url.removeprefix("http://").split(":")
        t0 = time.perf_counter()
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(read_timeout)
            sock.sendall(request)
            data = b""
            try:
                while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/"):
                    return Outcome(0, "closed without an answer", (time.perf_counter() - t0) * 1e3)
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
                length = int(headers.get("content-length", len(body)))
                while len(body) < length and (chunk := sock.recv(65536)):
                    body += chunk
            except TimeoutError:
                return Outcome(0, "no answer", (time.perf_counter() - t0) * 1e3)
        return _classify(int(lines[0].split(" ", 2)[1]), body, t0)

    return send


def trickle(seconds: float) -> Callable:
    """A body that arrives a byte at a time for ``seconds``."""

    def body():
        yield b'{"input": ["'
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            yield b"a"
        yield b'"]}'

    def send(url: str) -> Outcome:
        return post(content=body(), headers={"content-type": "application/json"}, timeout=seconds + 30)(url)

    return send


def flood(n: int) -> Callable:
    """``n`` concurrent requests of 64 texts; 503 ``overloaded`` if every refusal was the service's JSON
    503 with Retry-After, the answers counted by kind in ``detail``."""
    texts = ["graph community summary " * 10] * 64

    def send(url: str) -> Outcome:
        async def go():
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
                return await asyncio.gather(
                    *(client.post("/v1/embeddings", json={"input": texts}, headers=GOOD) for _ in range(n))
                )

        t0 = time.perf_counter()
        responses = asyncio.run(go())
        kinds = [(r.status_code, _outcome(r, t0).code, r.headers.get("retry-after")) for r in responses]
        refused = [(code, retry) for status, code, retry in kinds if status == 503]
        ok = refused and all(code == "overloaded" and retry for code, retry in refused)
        counts = Counter(str(status) if status == 200 else f"{status} {code}" for status, code, _ in kinds)
        detail = "; ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        ms = (time.perf_counter() - t0) * 1e3
        return Outcome(503 if ok else 0, "overloaded" if ok else "mixed", ms, detail=f"({detail})")

    return send


def cases(client_timeout_s: float, body_timeout_s: float, haproxy: bool) -> list[Case]:
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
    over_long = "word " * 400
    c = Case
    return [
        # routes and methods
        c("GET /v1/embeddings", http("GET", "/v1/embeddings", GOOD), 405, "method_not_allowed"),
        c("PUT /v1/embeddings", http("PUT", "/v1/embeddings", GOOD), 405, "method_not_allowed"),
        c("DELETE /health", http("DELETE", "/health"), 405, "method_not_allowed"),
        c("PATCH /v1/models", http("PATCH", "/v1/models", GOOD), 405, "method_not_allowed"),
        c("GET /nope", http("GET", "/nope", GOOD), 404, "not_found"),
        c("POST /v1/completions", http("POST", "/v1/completions", GOOD, json={}), 404, "not_found"),
        c("HEAD /health", http("HEAD", "/health"), 200, "-"),
        c("HEAD /v1/models", http("HEAD", "/v1/models", GOOD), 200, "-"),
        c("OPTIONS /v1/embeddings", http("OPTIONS", "/v1/embeddings", GOOD), 405, "method_not_allowed"),
        # keys
        c("no key", http("POST", "/v1/embeddings", json={"input": "a"}), 401, "invalid_api_key"),
        c("wrong key", post({"input": "a"}, {"Authorization": "Bearer nope"}), 401, "invalid_api_key"),
        c("Basic auth", post({"input": "a"}, {"Authorization": f"Basic {KEY}"}), 401, "invalid_api_key"),
        c(
            "an 8 KB key",
            post({"input": "a"}, {"Authorization": "Bearer " + "k" * 8_000}),
            401,
            "invalid_api_key",
        ),
        c("GET /v1/models, no key", http("GET", "/v1/models"), 401, "invalid_api_key"),
        c("GET /health, no key", http("GET", "/health"), 200, "-"),
        # bodies
        c(
            "malformed JSON",
            post(content=b'{"input": [', headers={"content-type": "application/json"}),
            400,
            "invalid_request",
        ),
        c("empty body", post(content=b""), 400, "invalid_request"),
        c("non-UTF-8 body", post(content=b'{"input": ["\xff\xfe"]}'), 400, "invalid_request"),
        c("JSON array body", post([1, 2]), 400, "invalid_request"),
        c("JSON string body", post("text"), 400, "invalid_request"),
        c("NaN literal", post(content=b'{"input": NaN}'), 400, "invalid_request"),
        c("100,000-deep nesting", post(content=b"[" * 100_000 + b"]" * 100_000), 400, "invalid_request"),
        c("input missing", post({"model": "tree_comm"}), 400, "invalid_request"),
        c("input null", post({"input": None}), 400, "invalid_request"),
        c("input int", post({"input": 3}), 400, "invalid_request"),
        c("input dict", post({"input": {"a": 1}}), 400, "invalid_request"),
        c("input [null]", post({"input": [None]}), 400, "invalid_request"),
        c("input []", post({"input": []}), 400, "invalid_request"),
        c("token ids", post({"input": [1, 2, 3]}), 400, "token_ids_not_supported"),
        c("nested token ids", post({"input": [[1, 2], [3]]}), 400, "token_ids_not_supported"),
        c("unknown field", post({"input": "a", "temperature": 1}), 400, "invalid_request"),
        c("model int", post({"input": "a", "model": 7}), 400, "invalid_request"),
        c("unknown model", post({"input": "a", "model": "gpt-9"}), 404, "model_not_found"),
        c("a 1 MB model name", post({"input": "a", "model": "m" * 2**20}), 404, "model_not_found"),
        c("encoding_format hex", post({"input": "a", "encoding_format": "hex"}), 400, "invalid_request"),
        c("dimensions 0", post({"input": "a", "dimensions": 0}), 400, "invalid_request"),
        c("dimensions -1", post({"input": "a", "dimensions": -1}), 400, "invalid_request"),
        c(
            "dimensions 385 (model: 384)",
            post({"input": "a", "dimensions": 385}),
            400,
            "dimensions_not_supported",
        ),
        c("dimensions '12'", post({"input": "a", "dimensions": "12"}), 400, "invalid_request"),
        c("dimensions true", post({"input": "a", "dimensions": True}), 400, "invalid_request"),
        c("dimensions 1e308", post(content=b'{"input": "a", "dimensions": 1e308}'), 400, "invalid_request"),
        c("unknown prompt_name", post({"input": "a", "prompt_name": "query"}), 400, "prompt_not_found"),
        c("normalize 'yes'", post({"input": "a", "normalize": "yes"}), 400, "invalid_request"),
        c("truncate 'no'", post({"input": "a", "truncate": "no"}), 400, "invalid_request"),
        c("truncate false, 400 tokens", post({"input": over_long, "truncate": False}), 400, "input_too_long"),
        c("lone surrogate", post(content=b'{"input": ["\\ud800"]}'), 400, "invalid_request"),
        c("2049 inputs", post({"input": ["a"] * 2049}), 413, "too_many_inputs"),
        c("64 MB body", post(content=b"x" * 64 * 2**20), 413, "body_too_large"),
        c("20 MB chunked body", post(content=iter([b"x" * 2**20] * 20)), 413, "body_too_large"),
        c(f"body trickling {body_timeout_s + 3:g} s", trickle(body_timeout_s + 3), 408, "body_timeout"),
        # inputs that are valid, if odd
        c('input ""', post({"input": ""}), 200, "-"),
        c("NUL characters", post({"input": ["a\x00b", "\x00"]}), 200, "-"),
        c("1 MB of whitespace", post({"input": " " * 2**20}), 200, "-"),
        c("a 3 MB text", post({"input": "entity " * 450_000}), 200, "-"),
        c(
            "dimensions 8 (model not matryoshka)",
            post({"input": "a", "dimensions": 8}),
            400,
            "dimensions_not_supported",
        ),
        c(
            "dimensions 384 + base64",
            post({"input": "a", "dimensions": 384, "encoding_format": "base64"}),
            200,
            "-",
        ),
        c(
            "text/plain content type",
            post(content=b'{"input": "a"}', headers={"content-type": "text/plain"}),
            200,
            "-",
        ),
        # the wire
        c("Content-Length: -1", raw(head + b"Content-Length: -1\r\n\r\n"), 400, FRONT),
        c("Content-Length: abc", raw(head + b"Content-Length: abc\r\n\r\n"), 400, FRONT),
        # Serve's proxy passes it on (no body: our 400); HAProxy refuses headers over its buffer
        c(
            "a 100 KB header",
            raw(head + b"X-Big: " + b"b" * 100_000 + b"\r\n\r\n"),
            400,
            FRONT if haproxy else "invalid_request",
        ),
        c(
            "non-UTF-8 x-request-id",
            raw(head + b"x-request-id: \xff\xfe\r\nContent-Length: 14\r\n\r\n" + b'{"input": "a"}'),
            500,
            "ray",
        ),
        c(
            f"silent mid-headers ({client_timeout_s:g} s)",
            raw(head, read_timeout=client_timeout_s + 10),
            *((408, FRONT) if haproxy else (0, "no answer")),  # Serve's proxy: no header timeout (docs/api)
        ),
        # overload
        c("64 concurrent bulk requests", flood(64), 503, "overloaded"),
        c("300 concurrent (past Serve's 8+8+64)", flood(300), 503, "overloaded"),
    ]


def models_config(body_timeout_s: float) -> str:
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/models.local.yaml").read_text())
    data["router"].update(
        api_keys_env=KEYS_ENV, max_ongoing_requests=8, max_queued_requests=8, body_timeout_s=body_timeout_s
    )
    for entry in data["models"]:
        entry.pop("cache", None)  # every request computed
    path = Path(tempfile.mkdtemp(prefix="sweep-")) / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def as_expected(case: Case, got: Outcome) -> bool:
    if got.status != case.expected_status:
        return False
    if case.expected_code == FRONT:
        return got.code.startswith("not-json")
    if case.expected_code == "ray":  # a known Ray answer (docs/known-issues.md)
        return True
    return got.code == case.expected_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_ingress_option(parser)
    parser.add_argument(
        "--client-timeout-s", type=int, default=30, help="HAProxy's client timeout (make serve: 30)"
    )
    parser.add_argument("--body-timeout-s", type=float, default=10.0, help="router.body_timeout_s")
    args = parser.parse_args()
    haproxy = use_haproxy(args)
    os.environ[KEYS_ENV] = KEY  # inherited by the raylet, hence the router
    os.environ["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] = str(args.client_timeout_s)
    url = start_local_service(models_config(args.body_timeout_s), free_port(), haproxy=haproxy)
    rows, failures = [], 0
    try:
        for case in cases(args.client_timeout_s, args.body_timeout_s, haproxy):
            try:
                got = case.send(url)
            except Exception as exc:  # noqa: BLE001 - a case that breaks the client is a finding too
                got = Outcome(0, f"{type(exc).__name__}: {str(exc)[:60]}", 0.0)
            ok = as_expected(case, got)
            failures += not ok
            rows.append(
                (
                    case.name,
                    f"{case.expected_status} {case.expected_code}",
                    f"{got.status} {got.code} {got.detail}".strip(),
                    got.ms,
                    ok,
                )
            )
        after = post({"input": ["Marie Curie"]})(url)
        rows.append(
            (
                "a normal request after the sweep",
                "200 -",
                f"{after.status} {after.code}",
                after.ms,
                after.status == 200,
            )
        )
        failures += after.status != 200
    finally:
        stop_local_service()
    front = "HAProxy" if haproxy else "Serve's proxy"
    print(f"\nAbuse sweep: {len(rows)} cases, {front} in front, router limits 8 + 8, keys on\n")
    print("| case | expected | got | ms | ok |\n| --- | --- | --- | ---: | --- |")
    for name, expected, got, ms, ok in rows:
        print(f"| {name} | {expected} | {got} | {ms:,.0f} | {'yes' if ok else 'NO'} |")
    print(f"\n{len(rows) - failures} of {len(rows)} as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
