"""The service's ASGI middlewares, outermost first: Observe (metrics), RequireToken (bearer token),
BodyLimit (body size and JSON structure). Plain ASGI rather than FastAPI dependencies or Starlette's
BaseHTTPMiddleware: resolving a dependency on every request cost the batched service 19% of its throughput
(BENCHMARKS.md, Serving).
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from serve.fast_routes import header
from serve.http_protocol import TIMED_OUT_STATUS
from serve.json_limits import JsonLimits, JsonTooComplex, check_json_structure

log = logging.getLogger("serve.http")


def is_json_content(scope) -> bool:
    """No Content-Type, application/json or application/*+json: bodies FastAPI or the service read as JSON."""
    content_type = header(scope, b"content-type")
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BodyLimit:
    """Refuse bodies over `max_body_bytes` (by Content-Length at once, or while a chunked body streams in), and
    JSON bodies past `json_limits` (depth, arrays, values; serve.json_limits) before anything parses them.

    A refusal while the body streams raises HTTPException from `receive`, inside the route, which answers it as
    JSON before any response has started. An HTTPException, not our BadInput: FastAPI turns any other error
    raised while it parses a body model into a 400 "error parsing the body".
    """

    def __init__(self, app, max_body_bytes: int, json_limits: JsonLimits) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_limits = json_limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            response = JSONResponse({"detail": f"request body of {length.decode(errors='replace')} bytes exceeds "
                                               f"the limit of {self.max_body_bytes} bytes"}, status_code=413)
            return await response(scope, receive, send)
        received = 0
        json_chunks: list[bytes] | None = [] if is_json_content(scope) else None

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
                if json_chunks is not None:
                    json_chunks.append(chunk)
                    if not message.get("more_body", False):
                        body = chunk if len(json_chunks) == 1 else b"".join(json_chunks)
                        json_chunks.clear()
                        try:
                            check_json_structure(body, self.json_limits)
                        except JsonTooComplex as error:
                            raise HTTPException(error.status, str(error)) from None
            return message

        await self.app(scope, limited_receive, send)


PROTECTED_PREFIXES = ("/v1/", "/metrics")


class RequireToken:
    """The bearer token on /v1/* and /metrics, checked before routing.

    """

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            given = header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(
                    {"detail": "missing or wrong bearer token (Authorization: Bearer $VAE_SERVE_TOKEN)"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before its answer; never sent


class Observe:
    """Count requests by endpoint and status and time them (pure ASGI: no per-request task or copy).

    A client that disconnects before its body has arrived is counted as 499, not as a server error, and
    whatever the app raises because the body never came is not logged as a traceback."""

    def __init__(self, app, requests, latency) -> None:
        self.app = app
        self.requests = requests  # prometheus Counter by (endpoint, status)
        self.latency = latency  # prometheus Histogram by endpoint

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        gone = False  # the client disconnected before it had sent its whole body

        async def watch_receive():
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and status == 500:
                gone = True
            return message

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and not gone:  # an answer to nobody is not counted as sent
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, watch_receive, record_status)
        except Exception:
            if not gone:
                raise
            log.debug("client disconnected before sending its body", exc_info=True)
        finally:
            if gone and status == 500:
                status = scope.get(TIMED_OUT_STATUS, CLIENT_CLOSED_REQUEST)
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the router sets scope["route"]
            self.requests.labels(endpoint, str(status)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)
