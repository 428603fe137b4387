"""`python -m serve http`: the model over HTTP (FastAPI + uvicorn) with dynamic batching.

Endpoints under /v1/: sample, decode, encode, reconstruct, interpolate, score. Images come in as a
JSON body {"images": [[[[...]]]]} (B, C, H, W) floats in [0, 1], as PNG uploads (multipart/form-data,
any field name, several files allowed) or as one raw image body (Content-Type: image/png).
Answers are JSON, or a PNG image/grid with `?format=png`. /healthz, /readyz, /metrics, /docs.
JSON bodies to /v1/sample and /v1/decode take a shorter way past FastAPI's request machinery
(`serve.fast_routes`): same models, same handlers, same answers.

Requests are untrusted: request heads are bounded and slow clients cut off per connection
(`serve.http_protocol`), bodies by size and JSON bodies by structure before parsing (`BodyLimit`,
`serve.json_limits`), images by their declared pixel count before decoding (`VAERuntime.image_from_bytes`),
and bodies are parsed and decoded on worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, StrictFloat

from pipeline.images import (ImageTooLargeError, encode_png, make_grid, nchw_to_nhwc, nhwc_to_nchw, to_uint8,
                             to_unit_float)
from serve.batching import BatchingOptions, DynamicBatcher, QueueFull
from serve.fast_routes import FastJsonRoutes, FastRoute, header
from serve.http_protocol import TIMED_OUT_STATUS, ConnectionLimits, limited_protocol
from serve.json_limits import JsonLimits, JsonTooComplex, check_json_structure
from serve.runtime import (LOGVAR_MAX, LOGVAR_MIN, NonFiniteOutput, VAERuntime, check_outputs, complexity_nats,
                           interpolate_latents, latents_for_score, score_from_parts, score_noise)

TOKEN_ENV = "VAE_SERVE_TOKEN"
Output = Literal["json", "png"]
MAX_ABS_LATENT = 1e4
log = logging.getLogger("serve.http")


@dataclass(frozen=True)
class ServiceOptions:
    """Limits and batching of the HTTP service."""

    batching: BatchingOptions = field(default_factory=BatchingOptions)
    """Dynamic batching (max batch size, max queue delay, bounded queue)."""
    max_items: int = 256
    """Most images or latents in one request."""
    max_score_samples: int = 64
    """Most z samples per image for /v1/score."""
    max_body_bytes: int = 16 << 20
    """Largest request body; bigger ones get 413."""
    token: str = ""
    """Bearer token required on /v1/* and /metrics when not empty (default: $VAE_SERVE_TOKEN)."""
    threshold: float | None = None
    """Anomaly threshold (from `score --calibrate`): /v1/score then says which images exceed it."""
    threshold_score: tuple[str, str] = ("elbo", "none")
    """(method, complexity) the threshold was calibrated with: only requests scored alike are flagged."""
    retry_after_s: int = 1
    """Retry-After sent with 503 when the queue is full."""


class BadInput(ValueError):
    """A request problem the client must fix: answered with 4xx and this message."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- request/response bodies

class SampleRequest(BaseModel):
    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, ge=0, lt=2**63, description="noise seed; omitted: a random one, echoed back")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="scale of z ~ N(0, I)")


class DecodeRequest(BaseModel):
    # Strict: JSON numbers only, as /v1/encode takes them (lax floats read `true` as 1.0 and "1.5" as 1.5).
    z: list[list[StrictFloat]] = Field(..., description="latents (B, latent_dim)")


class ImagesResponse(BaseModel):
    images: list = Field(..., description="(B, C, H, W) pixel means in [0, 1]")
    shape: list[int]
    seed: int | None = None


class EncodeResponse(BaseModel):
    mean: list[list[float]]
    logvar: list[list[float]]
    z: list[list[float]] | None = Field(None, description="z ~ q(z|x) when sample=true")
    seed: int | None = None


class ScoreResponse(BaseModel):
    scores: list[float] = Field(..., description="negative ELBO (or IWAE bound) per image, nats; higher = more anomalous")
    method: str
    complexity: str = Field("none", description="png: the PNG code length was subtracted (input-complexity score)")
    num_samples: int
    seed: int
    threshold: float | None = None
    is_anomaly: list[bool] | None = None


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error the service answers: a message, or (for a body that fails its schema) one entry per problem."""

    detail: str | list[ValidationIssue]


class StatusResponse(BaseModel):
    status: str


ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "malformed body (not JSON, JSON nested too deep, a broken multipart body)",
    401: "missing or wrong bearer token (when $VAE_SERVE_TOKEN is set)",
    413: "body, image or batch past a limit",
    415: "unsupported Content-Type",
    422: "the body or a parameter is not what the endpoint takes",
    500: "the model produced NaN/Inf or pixels outside [0, 1] for this input",
    503: "server busy (Retry-After says when to retry)",
}.items()}
PNG_ANSWER = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                    "description": "JSON, or a PNG image or grid with ?format=png"}}



def _exactly(item: dict, count: int) -> dict:
    return {"type": "array", "items": item, "minItems": count, "maxItems": count}


def image_body(image_shape: tuple[int, int, int], min_images: int, max_images: int) -> dict:
    """The documented request body of an image endpoint (`openapi_extra`): JSON arrays of the model's exact
    shape, PNG uploads, or one raw PNG."""
    channels, height, width = image_shape
    pixel = {"type": "number", "minimum": 0.0, "maximum": 1.0}
    images = {"type": "array", "items": _exactly(_exactly(_exactly(pixel, width), height), channels),
              "minItems": min_images, "maxItems": max_images,
              "description": f"(B, {channels}, {height}, {width}) floats in [0, 1]"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {"images": images}}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    }}}


# ---------------------------------------------------------------- the application

class Service:
    """The runtime, the two batchers and the metrics behind one app."""

    def __init__(self, runtime: VAERuntime, options: ServiceOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.ready = False
        self.not_ready_reason = "warming up"
        self.registry = CollectorRegistry()
        self.requests = Counter("vae_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("vae_request_latency_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_rows = Histogram("vae_batch_size", "rows per device call", ["graph"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
                                    registry=self.registry)
        self.queue_depth = Gauge("vae_queue_depth", "requests waiting for a device batch", ["graph"],
                                 registry=self.registry)
        self.nonfinite = Counter("vae_nonfinite_outputs", "requests answered 500 because a graph's output (or "
                                 "the score) was NaN/Inf or out of range", ["graph"], registry=self.registry)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="device")  # one device call at a time
        # Request bodies (JSON, PNG) are parsed and decoded here, never on the event loop: a slow one would
        # hold up every other request, /healthz included.
        self.parsing = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="parse")
        self.encoder: DynamicBatcher | None = None
        self.decoder: DynamicBatcher | None = None

    def start(self) -> None:
        batching = self.options.batching
        self.encoder = DynamicBatcher(
            "encoder", lambda x: self.runtime.encoder.run(x, ["mean", "logvar"], self.runtime.batch_size, check=False),
            batching,
            self.executor, on_batch=self.batch_rows.labels("encoder").observe,
            on_depth=self.queue_depth.labels("encoder").set)
        self.decoder = DynamicBatcher(
            "decoder", lambda z: self.runtime.decoder.run(z, ["params", "image"], self.runtime.batch_size, check=False),
            batching,
            self.executor, on_batch=self.batch_rows.labels("decoder").observe,
            on_depth=self.queue_depth.labels("decoder").set)
        self.encoder.start()
        self.decoder.start()

    async def warm_up(self) -> None:
        """One small and one full batch through each graph (first calls allocate and optimise), outputs checked:
        ready means the model answers correctly (the runtime's self-check passed at load as well)."""
        loop = asyncio.get_running_loop()
        channels, height, width = self.runtime.image_shape
        try:
            for rows in sorted({1, self.options.batching.max_batch_size}):
                x = np.full((rows, channels, height, width), 0.5, np.float32)
                z = np.zeros((rows, self.runtime.latent_dim), np.float32)
                await loop.run_in_executor(self.executor, self.runtime.encoder.run, x, ["mean", "logvar"], rows)
                await loop.run_in_executor(self.executor, self.runtime.decoder.run, z, ["params", "image"], rows)
        except NonFiniteOutput as error:
            self.not_ready_reason = f"warm-up failed: {error}"
            log.error("not ready: %s", self.not_ready_reason)
            return
        # Everything loaded so far lives as long as the process: moving it out of the collector's reach
        # keeps full collections short. Their pauses were the p99 tail under load (BENCHMARKS.md, Serving).
        gc.freeze()
        self.ready = True

    async def stop(self) -> None:
        for batcher in (self.encoder, self.decoder):
            if batcher is not None:
                await batcher.stop()
        self.executor.shutdown(wait=True)
        self.parsing.shutdown(wait=True)

    async def off_loop(self, function, *args):
        """`function(*args)` on the parsing threads."""
        return await asyncio.get_running_loop().run_in_executor(self.parsing, function, *args)

    @staticmethod
    def _checked(graph: str, names: list[str], outputs: list[np.ndarray]) -> list[np.ndarray]:
        check_outputs(graph, names, outputs)  # per request: a NaN for one input fails only its own request
        return outputs

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = self._checked("encoder", ["mean", "logvar"], await self.encoder.submit(x))
        return mean, np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    async def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params, image = self._checked("decoder", ["params", "image"],
                                      await self.decoder.submit(np.ascontiguousarray(z, dtype=np.float32)))
        return params, image


def _is_json_content(scope) -> bool:
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
        json_chunks: list[bytes] | None = [] if _is_json_content(scope) else None

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

    Plain ASGI rather than a FastAPI dependency: resolving a dependency on every request cost the
    batched service 19% of its throughput (BENCHMARKS.md, Serving).
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


def _document(app: FastAPI, runtime: VAERuntime, options: ServiceOptions) -> None:
    """Make /openapi.json and /docs state what the handlers enforce beyond the pydantic models: the limits
    (rows, latent size, value ranges, parameter maxima) and the token requirement (the middleware enforces it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            models = schema["components"]["schemas"]
            latent_row = _exactly({"type": "number", "minimum": -MAX_ABS_LATENT, "maximum": MAX_ABS_LATENT},
                                  runtime.latent_dim)
            models["DecodeRequest"]["properties"]["z"].update(items=latent_row, minItems=1, maxItems=options.max_items)
            models["SampleRequest"]["properties"]["n"]["maximum"] = options.max_items
            maxima = {"steps": options.max_items, "num_samples": options.max_score_samples}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        if parameter["name"] in maxima:
                            parameter["schema"]["maximum"] = maxima[parameter["name"]]
            if options.token:
                schema["components"].setdefault("securitySchemes", {})["bearer"] = {
                    "type": "http", "scheme": "bearer", "description": "$VAE_SERVE_TOKEN"}
                for path, operations in schema["paths"].items():
                    if path.startswith(PROTECTED_PREFIXES):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before its answer; never sent


class Observe:
    """Count requests by endpoint and status and time them (pure ASGI: no per-request task or copy).

    A client that disconnects before its body has arrived is counted as 499, not as a server error, and
    whatever the app raises because the body never came is not logged as a traceback."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

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
            self.service.requests.labels(endpoint, str(status)).inc()
            self.service.latency.labels(endpoint).observe(time.perf_counter() - started)


def _array_from_json(value, name: str) -> np.ndarray:
    """Nested JSON lists to a float array; the error names what is wrong with them."""
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise BadInput(f"{name}: not a rectangular array ({error})") from error
    if array.dtype == object:
        raise BadInput(f"{name}: not a rectangular array of numbers (ragged lists, nulls or mixed types)")
    if array.dtype == np.bool_:
        raise BadInput(f"{name}: expected numbers, got booleans")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise BadInput(f"{name}: expected numbers, got {array.dtype.kind == 'U' and 'strings' or array.dtype}")
    return array.astype(np.float64)


def _loads_json(body: bytes):
    """The parsed body: orjson (about 6x faster than json on image arrays), then json for what orjson refuses,
    so NaN/Infinity still reach the finite check with its message and malformed JSON gets json's error text.
    Bodies reach this only within BodyLimit's JSON limits (5 levels deep), so json cannot recurse deeply."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _json(payload: dict) -> Response:
    """A JSON answer; numpy arrays go straight to orjson (json.dumps of float lists was an eighth of the
    service's CPU per request). float32 values are written as the shortest text that reads back exactly."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _format_response(images: np.ndarray, output: str, extra: dict, num_cols: int = 8) -> Response:
    if output == "png":
        pixels = to_uint8(nchw_to_nhwc(images))
        png = encode_png(pixels[0] if len(pixels) == 1 else make_grid(pixels, num_cols=num_cols))
        return Response(png, media_type="image/png", headers={"X-Images": str(len(images))})
    return _json({"images": _float32(images), "shape": list(images.shape), **extra})


def create_app(runtime: VAERuntime, options: ServiceOptions | None = None) -> FastAPI:
    """The FastAPI app serving `runtime` (a uvicorn target: `uvicorn.run(create_app(...))`)."""
    options = options or ServiceOptions(token=os.environ.get(TOKEN_ENV, ""))
    problems = options.batching.problems()
    if options.max_items < 1:
        problems.append(f"max_items must be >= 1, got {options.max_items}")
    if problems:
        raise ValueError("invalid service options: " + "; ".join(problems))
    service = Service(runtime, options)
    channels, height, width = runtime.image_shape
    max_items = options.max_items
    images_body = image_body(runtime.image_shape, 1, max_items)
    # The largest body any endpoint takes is {"images": [B][C][H][W]} (depth 5) or {"z": [B][latent]}. Twice its
    # arrays and values still bounds the work, and lets a body just past a limit get the handler's precise message.
    json_limits = JsonLimits(
        max_depth=5, max_containers=2 * (2 + max_items * (1 + channels * (1 + height))),
        max_values=2 * (max_items * max(channels * height * width, runtime.latent_dim) + 16))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        warm = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:
            # uvicorn has already let in-flight requests finish; drain what is queued, then stop.
            await warm
            await service.stop()

    app = FastAPI(title="vae-pipeline serve", version="1",
                  description=f"Exported VAE ({runtime.metadata.get('likelihood')} likelihood, latent "
                              f"{runtime.latent_dim}, images {channels}x{height}x{width}) with dynamic batching.",
                  lifespan=lifespan)
    app.state.service = service
    # -------------------------------------------------------- middleware: body limit, token, metrics

    def answer_error(error: Exception) -> Response | None:
        """The answer to an error a handler raised on purpose (None: not one of ours, a 500)."""
        if isinstance(error, BadInput):
            return JSONResponse({"detail": str(error)}, status_code=error.status)
        if isinstance(error, HTTPException):  # a streamed body past the limit (BodyLimit)
            return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
        if isinstance(error, QueueFull):
            return JSONResponse({"detail": f"server busy: {error}; retry later"}, status_code=503,
                                headers={"Retry-After": str(options.retry_after_s)})
        if isinstance(error, NonFiniteOutput):
            service.nonfinite.labels(error.graph).inc()
            log.error("%s", error)
            return JSONResponse({"detail": str(error)}, status_code=500)
        return None

    fast_routes: dict[str, FastRoute] = {}  # filled in below, once the routes exist
    app.add_middleware(FastJsonRoutes, routes=fast_routes, answer_error=answer_error)  # added first: innermost
    app.add_middleware(BodyLimit, max_body_bytes=options.max_body_bytes, json_limits=json_limits)
    if options.token:
        app.add_middleware(RequireToken, token=options.token)
    _document(app, runtime, options)
    app.add_middleware(Observe, service=service)  # added last, so outermost: 401s and 413s are counted too

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, error: BadInput):
        return answer_error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        # FastAPI's default echoes each bad input back: an Inf there cannot be written as JSON (a 500),
        # and echoing a large body is wasteful. Location, message and type name the problem.
        return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                                        for e in error.errors()]}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return answer_error(error)

    @app.exception_handler(NonFiniteOutput)
    async def nonfinite_output(request: Request, error: NonFiniteOutput):
        return answer_error(error)

    async def read_images(request: Request) -> np.ndarray:
        """(B, C, H, W) float32 in [0, 1] from a JSON, multipart or raw image body; parsed off the event loop."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()  # whole, before parsing: BodyLimit refuses it past its limits as it streams
        if content_type == "multipart/form-data":
            async def replay() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            try:  # only splits the body into parts (bounded by the body limit); decoding happens off the loop
                form = await Request(request.scope, replay).form(max_files=max_items + 1, max_fields=max_items + 1)
            except Exception as error:  # python-multipart raises several types for malformed bodies
                raise BadInput(f"malformed multipart body: {error}", 400) from error
            uploads = [value for _, value in form.multi_items() if hasattr(value, "read")]
            if not uploads:
                raise BadInput("multipart body holds no files: upload PNG images as file fields")
            blobs = [await upload.read() for upload in uploads]
            return await service.off_loop(images_from_blobs, blobs)
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await service.off_loop(images_from_blobs, [body])
        if content_type not in ("application/json", ""):
            raise BadInput(f"unsupported Content-Type {content_type!r}: send application/json, "
                           "multipart/form-data or image/png", 415)
        return await service.off_loop(images_from_json, body)

    def images_from_json(body: bytes) -> np.ndarray:
        try:
            payload = _loads_json(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadInput(f"body is not valid JSON: {error}", 400) from error
        if not isinstance(payload, dict) or "images" not in payload:
            raise BadInput('expected a JSON object {"images": [...]} with images of shape '
                           f"(B, {channels}, {height}, {width})")
        x = _array_from_json(payload["images"], "images")
        if x.ndim >= 1 and len(x) > max_items:
            raise BadInput(f"too many images: {len(x)} > {max_items} per request", 413)
        if x.ndim == 4 and len(x) == 0:
            raise BadInput("images: empty batch")
        return check(runtime.check_images, x)

    def images_from_blobs(blobs: list[bytes]) -> np.ndarray:
        if len(blobs) > max_items:
            raise BadInput(f"too many images: {len(blobs)} > {max_items} per request", 413)
        images = []
        for index, blob in enumerate(blobs):
            try:  # refused from its header when it declares far more pixels than the model takes
                images.append(runtime.image_from_bytes(blob))
            except ValueError as error:
                raise BadInput(f"image {index}: {error}", 413 if isinstance(error, ImageTooLargeError) else 422
                               ) from error
        return nhwc_to_nchw(to_unit_float(np.stack(images)))

    def check(function, *args):
        try:
            return function(*args)
        except (ValueError, TypeError) as error:
            raise BadInput(str(error)) from error

    def new_seed(seed: int | None) -> int:
        return secrets.randbits(32) if seed is None else seed

    # -------------------------------------------------------- probes

    @app.get("/healthz", tags=["probes"], response_model=StatusResponse, summary="the process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], summary="the model answers correctly (loaded, self-checked, warmed up)",
             responses={503: {"model": StatusResponse, "description": "not ready: warming up, or why not"}})
    async def readyz():
        if not service.ready:
            return JSONResponse({"status": service.not_ready_reason}, status_code=503)
        return {"status": "ready", "provider": runtime.provider, "latent_dim": runtime.latent_dim,
                "image_shape": list(runtime.image_shape), "likelihood": runtime.likelihood}

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse,
             responses={401: {"description": ERRORS[401]["description"], "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
                 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                "description": "Prometheus text format"}},
             summary="Prometheus metrics")
    async def metrics():
        for name, batcher in (("encoder", service.encoder), ("decoder", service.decoder)):
            service.queue_depth.labels(name).set(batcher.depth if batcher else 0)
        return PlainTextResponse(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------- the model

    async def sample_images(body: SampleRequest, format: Output = "json") -> Response:
        if body.n > max_items:
            raise BadInput(f"too many images: n={body.n} > {max_items} per request", 413)
        seed = new_seed(body.seed)
        z = check(runtime.sample_latents, body.n, seed, body.temperature)
        _, images = await service.decode(z)
        return _format_response(images, format, {"seed": seed})

    async def decode_latents(body: DecodeRequest, format: Output = "json") -> Response:
        if len(body.z) > max_items:
            raise BadInput(f"too many latents: {len(body.z)} > {max_items} per request", 413)
        z = check(runtime.check_latents, _array_from_json(body.z, "z"))
        if len(z) == 0:
            raise BadInput("z: empty batch")
        if np.abs(z).max() > MAX_ABS_LATENT:  # the prior is N(0, I); such values only overflow the decoder
            raise BadInput(f"z: values must lie within +-{MAX_ABS_LATENT:g}, got {np.abs(z).max():.4g}")
        _, images = await service.decode(z)
        return _format_response(images, format, {})

    @app.post("/v1/sample", tags=["model"], response_model=ImagesResponse, responses={**ERRORS, **PNG_ANSWER}, summary="new images from z ~ N(0, T^2 I)")
    async def sample(body: SampleRequest, format: Output = "json"):
        return await sample_images(body, format)

    @app.post("/v1/decode", tags=["model"], response_model=ImagesResponse, responses={**ERRORS, **PNG_ANSWER}, summary="latents to images")
    async def decode(body: DecodeRequest, format: Output = "json"):
        return await decode_latents(body, format)

    @app.post("/v1/encode", tags=["model"], response_model=EncodeResponse, responses=ERRORS,
              openapi_extra=images_body, summary="images to q(z|x): mean and log-variance (and a sampled z)")
    async def encode(request: Request, sample: bool = False, seed: int | None = Query(None, ge=0, lt=2**63)):
        x = await read_images(request)
        mean, logvar = await service.encode(x)
        result = {"mean": _float32(mean), "logvar": _float32(logvar)}
        if sample:
            seed = new_seed(seed)
            eps = np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
            result.update(z=_float32(mean + np.exp(0.5 * logvar) * eps), seed=seed)
        return _json(result)

    @app.post("/v1/reconstruct", tags=["model"], response_model=ImagesResponse,
              openapi_extra=images_body, responses={**ERRORS, **PNG_ANSWER},
              summary="decode the posterior mean of each image")
    async def reconstruct(request: Request, format: Output = "json"):
        x = await read_images(request)
        mean, _ = await service.encode(x)
        _, images = await service.decode(mean)
        return _format_response(images, format, {})

    @app.post("/v1/interpolate", tags=["model"], response_model=ImagesResponse,
              openapi_extra=image_body(runtime.image_shape, 2, 2), responses={**ERRORS, **PNG_ANSWER},
              summary="decoded path between two images' latents (send exactly two images)")
    async def interpolate(request: Request, steps: int = Query(8, ge=2), mode: Literal["linear", "slerp"] = "linear",
                          format: Output = "json"):
        if steps > max_items:
            raise BadInput(f"too many steps: {steps} > {max_items} per request", 413)
        x = await read_images(request)
        if len(x) != 2:
            raise BadInput(f"interpolate takes exactly 2 images (a, b), got {len(x)}")
        mean, _ = await service.encode(x)
        z = interpolate_latents(mean[0], mean[1], steps, mode)
        _, images = await service.decode(z)
        return _format_response(images, format, {}, num_cols=steps)

    @app.post("/v1/score", tags=["model"], response_model=ScoreResponse, responses=ERRORS,
              openapi_extra=images_body, summary="anomaly score per image (negative ELBO or IWAE bound, nats)")
    async def score(request: Request, num_samples: int = Query(1, ge=1), method: Literal["elbo", "iwae"] = "elbo",
                    complexity: Literal["none", "png"] = "none", seed: int = Query(0, ge=0, lt=2**63)):
        if num_samples > options.max_score_samples:
            raise BadInput(f"num_samples={num_samples} > {options.max_score_samples}", 422)
        x = await read_images(request)
        if len(x) * num_samples > 8 * max_items:
            raise BadInput(f"{len(x)} images x num_samples={num_samples} exceeds {8 * max_items} decoder rows", 413)
        mean, logvar = await service.encode(x)
        eps = score_noise(len(x), num_samples, runtime.latent_dim, seed)
        z = latents_for_score(mean, logvar, eps).reshape(-1, runtime.latent_dim)
        params, _ = await service.decode(z)
        scores = score_from_parts(x, mean, logvar, eps, params, method, runtime.likelihood, runtime.likelihood_params)
        if complexity == "png":  # PNG encoding (Pillow releases the GIL) off the event loop and the device thread
            scores = scores - await asyncio.to_thread(complexity_nats, x)
        result = {"scores": [float(s) for s in scores], "method": method, "complexity": complexity,
                  "num_samples": num_samples, "seed": seed}
        if options.threshold is not None and (method, complexity) == tuple(options.threshold_score):
            result.update(threshold=options.threshold, is_anomaly=[bool(s > options.threshold) for s in scores])
        return JSONResponse(result)

    routes = {route.path: route for route in app.routes}
    fast_routes.update({"/v1/sample": FastRoute(SampleRequest, sample_images, routes["/v1/sample"]),
                        "/v1/decode": FastRoute(DecodeRequest, decode_latents, routes["/v1/decode"])})
    return app


@dataclass(frozen=True)
class ServerOptions:
    """What uvicorn enforces per connection, before the app sees a request."""

    connection: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Request head size and count limits, head and body deadlines (serve.http_protocol)."""
    keep_alive_timeout_s: int = 5
    """An idle keep-alive connection is closed after this long."""
    max_connections: int = 1000
    """Open connections (and requests in flight) past which new requests get 503."""
    graceful_timeout_s: float = 30.0
    """How long shutdown waits for in-flight requests."""

    def problems(self) -> list[str]:
        problems = self.connection.problems()
        problems += [f"{name} must be >= 1, got {value}" for name, value in
                     (("keep_alive_timeout_s", self.keep_alive_timeout_s), ("max_connections", self.max_connections))
                     if not value >= 1]
        return problems


def serve(runtime: VAERuntime, options: ServiceOptions, host: str = "127.0.0.1", port: int = 8000,
          server: ServerOptions | None = None, log_level: str = "info") -> None:
    """Run the service until SIGINT/SIGTERM; in-flight requests finish first."""
    import uvicorn

    server = server or ServerOptions()
    if server.problems():
        raise ValueError("invalid server options: " + "; ".join(server.problems()))
    app = create_app(runtime, options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            http=limited_protocol(server.connection), timeout_keep_alive=server.keep_alive_timeout_s,
                            limit_concurrency=server.max_connections,
                            timeout_graceful_shutdown=server.graceful_timeout_s, lifespan="on")
    uvicorn.Server(config).run()
