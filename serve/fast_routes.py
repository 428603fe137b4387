"""A short way through for the service's hottest requests: JSON bodies posted to a few model endpoints.

For an n=1 `POST /v1/sample`, FastAPI's per-request machinery (its exception and exit-stack middleware,
routing, dependency solving, body parsing) took about 40% of the event loop's time (py-spy; BENCHMARKS.md,
Serving). This plain-ASGI layer answers such requests itself, with the same pydantic model and the same
handler function as the FastAPI route, so the answer is the same. Whatever it does not take on (a query
string, another Content-Type, a body that fails validation) goes on to FastAPI untouched, and FastAPI
answers it, its 422 errors included, exactly as before. It sits inside the service's own middleware (metrics,
token, body limit), so those apply to both ways alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class FastRoute:
    """One endpoint the short way: its body model, its handler, and the FastAPI route it stands in for."""

    model: type[BaseModel]
    """The pydantic model the FastAPI route validates its body with."""
    handle: Callable[[Any], Awaitable[Response]]
    """The function the FastAPI route calls with the validated body (query parameters at their defaults)."""
    route: Any
    """The FastAPI route, put in scope["route"] as the router would (metrics label requests by its path)."""


class FastJsonRoutes:
    """ASGI middleware answering `POST path` with a JSON body and no query string through `routes[path]`."""

    def __init__(self, app, routes: dict[str, FastRoute], answer_error: Callable[[Exception], Response | None]) -> None:
        self.app = app
        self.routes = routes  # filled in once the routes exist (the app builds its middleware lazily)
        self.answer_error = answer_error  # the app's own answer for an error its handlers raise, or None

    async def __call__(self, scope, receive, send) -> None:
        route = (self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST"
                 and not scope["query_string"] and _is_json(scope) else None)
        if route is None:
            return await self.app(scope, receive, send)
        scope["route"] = route.route
        try:
            body = await _read_body(receive)
            if body is None:  # the client went away before sending its body
                return
            try:
                request = route.model.model_validate_json(body)
            except ValidationError:
                request = None
            response = None if request is None else await route.handle(request)
        except Exception as error:
            response = self.answer_error(error)
            if response is None:
                raise
        if response is None:  # the body did not validate: FastAPI answers it, its 422 included
            return await self.app(scope, _replay(body, receive), send)
        await response(scope, receive, send)


def header(scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), without building a dict per request."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _is_json(scope) -> bool:
    """No Content-Type, or application/json: what FastAPI reads as a JSON body (rarer kinds take its way)."""
    content_type = header(scope, b"content-type")
    return content_type is None or content_type.split(b";", 1)[0].strip().lower() == b"application/json"


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands FastAPI the body already read, then whatever the client sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
