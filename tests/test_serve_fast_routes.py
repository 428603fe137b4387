"""serve.fast_routes in-process: which requests take the short way, and that the rest reach the app whole."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serve.fast_routes import FastJsonRoutes, FastRoute


class Body(BaseModel):
    n: int = Field(1, ge=1)


class Refused(ValueError):
    pass


def make_routes():
    """The middleware around an inner app that records what reached it; `handled` records the short way."""
    reached, handled = [], []

    async def inner(scope, receive, send):
        message = await receive()
        reached.append((scope["path"], scope["query_string"], message["body"]))
        response = JSONResponse({"by": "inner"}, status_code=422)
        await response(scope, receive, send)

    async def handle(body: Body):
        if body.n == 13:
            raise Refused("unlucky n")
        handled.append(body.n)
        return JSONResponse({"by": "short", "n": body.n})

    def answer_error(error):
        return JSONResponse({"detail": str(error)}, status_code=418) if isinstance(error, Refused) else None

    routes = {"/v1/sample": FastRoute(Body, handle, route="the-route")}
    return FastJsonRoutes(inner, routes, answer_error), reached, handled


def call(app, path="/v1/sample", body=b'{"n": 2}', query=b"", method="POST",
         headers=((b"content-type", b"application/json"),), chunks=None):
    """One request through `app`: (status, body, scope after the call)."""
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": list(headers)}
    parts = chunks if chunks is not None else [body]
    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), scope


def test_a_valid_json_body_is_answered_by_the_handler_without_the_app():
    app, reached, handled = make_routes()
    status, body, scope = call(app, chunks=[b'{"n"', b": 5}"])  # a body in two parts is read whole
    assert (status, handled, reached) == (200, [5], [])
    assert b'"short"' in body and scope["route"] == "the-route"  # metrics label it as the router would
    status, _, _ = call(app, headers=())  # no Content-Type reads as JSON, as FastAPI does
    assert status == 200 and handled == [5, 2]


@pytest.mark.parametrize("change", [
    {"body": b'{"n": 0}'},  # fails validation: the app writes the 422
    {"body": b"{not json"},
    {"query": b"format=png"},
    {"headers": ((b"content-type", b"application/x-www-form-urlencoded"),)},
    {"path": "/v1/encode"},
    {"method": "PUT"},
])
def test_anything_else_reaches_the_app_with_its_body_intact(change):
    app, reached, handled = make_routes()
    status, body, _ = call(app, **change)
    assert status == 422 and b'"inner"' in body and handled == []
    expected_body = change.get("body", b'{"n": 2}')
    assert reached == [(change.get("path", "/v1/sample"), change.get("query", b""), expected_body)]


def test_a_handlers_own_error_gets_the_apps_answer_and_others_propagate():
    app, _, _ = make_routes()
    status, body, _ = call(app, body=b'{"n": 13}')
    assert status == 418 and b"unlucky n" in body

    async def broken(body: Body):
        raise RuntimeError("bug")

    failing = FastJsonRoutes(None, {"/v1/sample": FastRoute(Body, broken, None)}, lambda error: None)
    with pytest.raises(RuntimeError, match="bug"):  # left to the server's 500 handling, not swallowed
        call(failing)
