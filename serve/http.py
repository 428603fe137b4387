"""`python -m serve http`: the model over HTTP (FastAPI + uvicorn) with dynamic batching.

Endpoints under /v1/: sample, decode, encode, reconstruct, interpolate, score. Images come in as a
JSON body {"images": [[[[...]]]]} (B, C, H, W) floats in [0, 1], as PNG uploads (multipart/form-data,
any field name, several files allowed) or as one raw image body (Content-Type: image/png).
Answers are JSON, or a PNG image/grid with `?format=png`. /healthz, /readyz, /metrics, /docs.

Each handler parses the request, runs one `serve.ops` operation on the `Service` (found in app.state),
whose device is the two dynamic batchers, and formats the answer; the operations check the inputs, the
same checks the command line gets. JSON bodies to /v1/sample and /v1/decode take a shorter way past
FastAPI's request machinery (`serve.fast_routes`): same models, same handlers, same answers.

Requests are untrusted: request heads are bounded and slow clients cut off per connection
(`serve.http_protocol`), bodies by size and JSON bodies by structure before parsing (`serve.middleware`,
`serve.json_limits`), images by their declared pixel count before decoding (`serve.ops.image_from_bytes`),
and bodies are parsed and decoded on worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import json
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.images import encode_png, make_grid, nchw_to_nhwc, nhwc_to_nchw, to_uint8, to_unit_float
from serve import ops
from serve.analysis import heat_map
from serve.batching import BatchingOptions, DynamicBatcher, QueueFull
from serve.fast_routes import FastJsonRoutes, FastRoute
from serve.http_protocol import ConnectionLimits, limited_protocol
from serve.http_schema import (ERRORS, PNG_ANSWER, DecodeRequest, EncodeResponse, ImagesResponse, SampleRequest,
                               ScoreResponse, StatusResponse, document_limits, image_body)
from serve.json_limits import JsonLimits
from serve.middleware import BodyLimit, Observe, RequireToken
from serve.ops import InvalidInput
from serve.runtime import NonFiniteOutput, VAERuntime

TOKEN_ENV = "VAE_SERVE_TOKEN"
Output = Literal["json", "png"]
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
    threshold_score: tuple[str, str, str] = ("likelihood", "elbo", "none")
    """(kind, method, complexity) the threshold was calibrated with: only requests scored alike are flagged."""
    retry_after_s: int = 1
    """Retry-After sent with 503 when the queue is full."""

    def problems(self) -> list[str]:
        problems = self.batching.problems()
        if self.max_items < 1:
            problems.append(f"max_items must be >= 1, got {self.max_items}")
        return problems


# ---------------------------------------------------------------- the service: a device for serve.ops

class Service:
    """The runtime, the two batchers and the metrics behind one app; `serve.ops`' device for the handlers."""

    def __init__(self, runtime: VAERuntime, options: ServiceOptions) -> None:
        self.runtime = runtime
        self.card = runtime.card
        self.options = options
        self.limits = ops.Limits(max_items=options.max_items, max_score_samples=options.max_score_samples)
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
        runtime = self.runtime
        self.encoder = self._batcher("encoder", lambda x: runtime.encoder.run(x, ["mean", "logvar"],
                                                                             runtime.batch_size, check=False))
        self.decoder = self._batcher("decoder", lambda z: runtime.decoder.run(z, ["params", "image"],
                                                                             runtime.batch_size, check=False))
        self.encoder.start()
        self.decoder.start()

    def _batcher(self, graph: str, run_batch: Callable[[np.ndarray], list[np.ndarray]]) -> DynamicBatcher:
        # outputs are checked per request (serve.ops): a NaN for one input fails only its own request
        return DynamicBatcher(graph, run_batch, self.options.batching, self.executor,
                              on_batch=self.batch_rows.labels(graph).observe,
                              on_depth=self.queue_depth.labels(graph).set)

    async def warm_up(self) -> None:
        """One small and one full batch through each graph (first calls allocate and optimise), outputs checked:
        ready means the model answers correctly (the runtime's self-check passed at load as well)."""
        loop = asyncio.get_running_loop()
        channels, height, width = self.card.image_shape
        try:
            for rows in sorted({1, self.options.batching.max_batch_size}):
                x = np.full((rows, channels, height, width), 0.5, np.float32)
                z = np.zeros((rows, self.card.latent_dim), np.float32)
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

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = await self.encoder.submit(x)
        return mean, logvar

    async def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params, image = await self.decoder.submit(z)
        return params, image

    async def offload(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on the parsing threads."""
        return await asyncio.get_running_loop().run_in_executor(self.parsing, function, *args)


def service_of(request: Request) -> Service:
    return request.app.state.service


# ---------------------------------------------------------------- errors

def answer_error(service: Service, error: Exception) -> Response | None:
    """The answer to an error raised on purpose (None: not one of ours, a 500)."""
    if isinstance(error, InvalidInput):
        return JSONResponse({"detail": str(error)}, status_code=error.status)
    if isinstance(error, HTTPException):  # a streamed body past the limit (BodyLimit)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    if isinstance(error, QueueFull):
        return JSONResponse({"detail": f"server busy: {error}; retry later"}, status_code=503,
                            headers={"Retry-After": str(service.options.retry_after_s)})
    if isinstance(error, NonFiniteOutput):
        service.nonfinite.labels(error.graph).inc()
        log.error("%s", error)
        return JSONResponse({"detail": str(error)}, status_code=500)
    return None


async def handle_error(request: Request, error: Exception) -> Response:
    return answer_error(service_of(request), error)


async def invalid_request(request: Request, error: RequestValidationError) -> Response:
    # FastAPI's default echoes each bad input back: an Inf there cannot be written as JSON (a 500),
    # and echoing a large body is wasteful. Location, message and type name the problem.
    return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                                    for e in error.errors()]}, status_code=422)


# ---------------------------------------------------------------- parsing

async def read_images(request: Request) -> np.ndarray:
    """(B, C, H, W) float32 in [0, 1] from a JSON, multipart or raw image body; parsed off the event loop."""
    service = service_of(request)
    max_items = service.options.max_items
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()  # whole, before parsing: BodyLimit refuses it past its limits as it streams
    if content_type == "multipart/form-data":
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:  # only splits the body into parts (bounded by the body limit); decoding happens off the loop
            form = await Request(request.scope, replay).form(max_files=max_items + 1, max_fields=max_items + 1)
        except Exception as error:  # python-multipart raises several types for malformed bodies
            raise InvalidInput(f"malformed multipart body: {error}", 400) from error
        uploads = [value for _, value in form.multi_items() if hasattr(value, "read")]
        if not uploads:
            raise InvalidInput("multipart body holds no files: upload PNG images as file fields")
        blobs = [await upload.read() for upload in uploads]
        return await service.offload(images_from_blobs, service, blobs)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return await service.offload(images_from_blobs, service, [body])
    if content_type not in ("application/json", ""):
        raise InvalidInput(f"unsupported Content-Type {content_type!r}: send application/json, "
                           "multipart/form-data or image/png", 415)
    return await service.offload(images_from_json, service, body)


def images_from_json(service: Service, body: bytes) -> np.ndarray:
    try:
        payload = loads_json(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"body is not valid JSON: {error}", 400) from error
    if not isinstance(payload, dict) or "images" not in payload:
        raise InvalidInput('expected a JSON object {"images": [...]} with images of shape '
                           f"(B, {', '.join(map(str, service.card.image_shape))})")
    return array_from_json(payload["images"], "images")  # checked by the operation


def images_from_blobs(service: Service, blobs: list[bytes]) -> np.ndarray:
    service.limits.check_count(len(blobs), "images")  # before any is decoded
    images = []
    for index, blob in enumerate(blobs):
        try:  # refused from its header when it declares far more pixels than the model takes
            images.append(ops.image_from_bytes(service.card, blob))
        except ops.TooLarge as error:
            raise ops.TooLarge(f"image {index}: {error}") from error
        except InvalidInput as error:
            raise InvalidInput(f"image {index}: {error}") from error
    return nhwc_to_nchw(to_unit_float(np.stack(images)))


def array_from_json(value, name: str) -> np.ndarray:
    """Nested JSON lists to a float array; the error names what is wrong with them."""
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise InvalidInput(f"{name}: not a rectangular array ({error})") from error
    if array.dtype == object:
        raise InvalidInput(f"{name}: not a rectangular array of numbers (ragged lists, nulls or mixed types)")
    if array.dtype == np.bool_:
        raise InvalidInput(f"{name}: expected numbers, got booleans")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidInput(f"{name}: expected numbers, got {array.dtype.kind == 'U' and 'strings' or array.dtype}")
    return array.astype(np.float64)


def loads_json(body: bytes):
    """The parsed body: orjson (about 6x faster than json on image arrays), then json for what orjson refuses,
    so NaN/Infinity still reach the finite check with its message and malformed JSON gets json's error text.
    Bodies reach this only within BodyLimit's JSON limits (5 levels deep), so json cannot recurse deeply."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def new_seed(seed: int | None) -> int:
    return secrets.randbits(32) if seed is None else seed


# ---------------------------------------------------------------- formatting

def json_answer(payload: dict) -> Response:
    """A JSON answer; numpy arrays go straight to orjson (json.dumps of float lists was an eighth of the
    service's CPU per request). float32 values are written as the shortest text that reads back exactly."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def images_answer(images: np.ndarray, output: str, extra: dict, num_cols: int = 8) -> Response:
    if output == "png":
        pixels = to_uint8(nchw_to_nhwc(images))
        png = encode_png(pixels[0] if len(pixels) == 1 else make_grid(pixels, num_cols=num_cols))
        return Response(png, media_type="image/png", headers={"X-Images": str(len(images))})
    return json_answer({"images": float32(images), "shape": list(images.shape), **extra})


def pixel_maps(maps: np.ndarray, output: str) -> list[dict]:
    """One entry per (H, W) map (ScoreResponse.maps): a base64 heat-map PNG or the values, with its maximum."""
    entries = []
    for values in maps:
        entry = {"max_nats": float(values.max()), "sum_nats": float(values.sum())}
        if output == "png":
            entry["png"] = base64.b64encode(encode_png(heat_map(values))).decode()
        else:
            entry["nats"] = float32(values)
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- handlers: parse -> operation -> format

async def healthz() -> dict:
    return {"status": "ok"}


async def readyz(request: Request):
    service = service_of(request)
    if not service.ready:
        return JSONResponse({"status": service.not_ready_reason}, status_code=503)
    return {"status": "ready", "provider": service.runtime.provider, "latent_dim": service.card.latent_dim,
            "image_shape": list(service.card.image_shape), "likelihood": service.card.likelihood}


async def metrics(request: Request):
    service = service_of(request)
    for name, batcher in (("encoder", service.encoder), ("decoder", service.decoder)):
        service.queue_depth.labels(name).set(batcher.depth if batcher else 0)
    return PlainTextResponse(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)


async def sample_answer(service: Service, body: SampleRequest, format: Output = "json") -> Response:
    seed = new_seed(body.seed)
    images = await ops.sample(service, body.n, seed, body.temperature, service.limits)
    return images_answer(images, format, {"seed": seed})


async def decode_answer(service: Service, body: DecodeRequest, format: Output = "json") -> Response:
    images = await ops.decode(service, array_from_json(body.z, "z"), service.limits)
    return images_answer(images, format, {})


async def sample(request: Request, body: SampleRequest, format: Output = "json"):
    return await sample_answer(service_of(request), body, format)


async def decode(request: Request, body: DecodeRequest, format: Output = "json"):
    return await decode_answer(service_of(request), body, format)


async def encode(request: Request, sample: bool = False, seed: int | None = Query(None, ge=0, lt=2**63)):
    service = service_of(request)
    posterior = await ops.encode(service, await read_images(request), service.limits)
    result = {"mean": float32(posterior.mean), "logvar": float32(posterior.logvar)}
    if sample:
        seed = new_seed(seed)
        result.update(z=float32(posterior.sample(seed)), seed=seed)
    return json_answer(result)


async def reconstruct(request: Request, format: Output = "json"):
    service = service_of(request)
    images = await ops.reconstruct(service, await read_images(request), service.limits)
    return images_answer(images, format, {})


async def interpolate(request: Request, steps: int = Query(8, ge=2), mode: Literal["linear", "slerp"] = "linear",
                      format: Output = "json"):
    service = service_of(request)
    images = await ops.interpolate(service, await read_images(request), steps, mode, service.limits)
    return images_answer(images, format, {}, num_cols=steps)


async def score(request: Request, num_samples: int = Query(1, ge=1), method: Literal["elbo", "iwae"] = "elbo",
                complexity: Literal["none", "png"] = "none", seed: int = Query(0, ge=0, lt=2**63),
                maps: Literal["none", "png", "json"] = "none",
                kind: Literal[ops.SCORE_KINDS] = Query("auto", description=ops.SCORE_KIND_HELP)):
    service = service_of(request)
    result = await ops.score(service, await read_images(request), num_samples, method, seed, complexity,
                             maps=maps != "none", limits=service.limits, kind=kind)
    answer = {"scores": [float(s) for s in result.scores], "kind": result.kind, "method": method,
              "complexity": complexity, "num_samples": num_samples, "seed": seed}
    if result.warning:
        answer["warning"] = result.warning
    threshold = service.options.threshold
    if threshold is not None and (result.kind, method, complexity) == tuple(service.options.threshold_score):
        answer.update(threshold=threshold, is_anomaly=[bool(s > threshold) for s in result.scores])
    if result.maps is not None:  # PNG encoding off the event loop
        answer["maps"] = await service.offload(pixel_maps, result.maps, maps)
    return json_answer(answer)


SCORE_DESCRIPTION = (
    "Anomaly score per image, higher = more anomalous. By default (`kind=auto`) the model's own combination: "
    "z(negative ELBO - PNG code length) + z(reconstruction squared error) (`png_mse`; `excess_mse` with the "
    "pixels' Bernoulli entropy for Bernoulli models), each base score standardised at export on the model's "
    "validation images; `kind=likelihood` gives the negative ELBO (or IWAE bound) in nats, which ranks simple "
    "inputs as normal. The answer's `kind` says which was computed. "
    "`maps=png` adds, per image, a heat map of -log p(x|z) per pixel (the ELBO's reconstruction term pixel by "
    "pixel, summed over channels, averaged over the z samples) as a base64 PNG on a 'hot' scale from 0 nats "
    "(black) to the map's maximum (white), with that maximum and the map's sum in nats; `maps=json` gives "
    "the values instead: `\"maps\": [{\"max_nats\", \"sum_nats\", \"png\" | \"nats\"}, ...]`.")


# ---------------------------------------------------------------- the app

def json_limits_for(image_shape: tuple[int, int, int], latent_dim: int, max_items: int) -> JsonLimits:
    """The largest body any endpoint takes is {"images": [B][C][H][W]} (depth 5) or {"z": [B][latent]}. Twice its
    arrays and values still bounds the work, and lets a body just past a limit get the operation's own message."""
    channels, height, width = image_shape
    return JsonLimits(max_depth=5, max_containers=2 * (2 + max_items * (1 + channels * (1 + height))),
                      max_values=2 * (max_items * max(channels * height * width, latent_dim) + 16))


def create_app(runtime: VAERuntime, options: ServiceOptions | None = None) -> FastAPI:
    """The FastAPI app serving `runtime` (a uvicorn target: `uvicorn.run(create_app(...))`)."""
    options = options or ServiceOptions(token=os.environ.get(TOKEN_ENV, ""))
    if options.problems():
        raise ValueError("invalid service options: " + "; ".join(options.problems()))
    service = Service(runtime, options)
    card = runtime.card
    channels, height, width = card.image_shape

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
                  description=f"Exported VAE ({card.likelihood} likelihood, latent {card.latent_dim}, images "
                              f"{channels}x{height}x{width}) with dynamic batching.", lifespan=lifespan)
    app.state.service = service
    for error in (InvalidInput, QueueFull, NonFiniteOutput):
        app.add_exception_handler(error, handle_error)
    app.add_exception_handler(RequestValidationError, invalid_request)

    images_body = image_body(card.image_shape, 1, options.max_items)
    model, with_png = {"tags": ["model"]}, {**ERRORS, **PNG_ANSWER}
    app.add_api_route("/healthz", healthz, tags=["probes"], response_model=StatusResponse,
                      summary="the process is alive")
    app.add_api_route("/readyz", readyz, tags=["probes"],
                      summary="the model answers correctly (loaded, self-checked, warmed up)",
                      responses={503: {"model": StatusResponse, "description": "not ready: warming up, or why not"}})
    app.add_api_route("/metrics", metrics, tags=["probes"], response_class=PlainTextResponse,
                      summary="Prometheus metrics",
                      responses={401: {"description": ERRORS[401]["description"], "content": {"application/json": {
                          "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
                          200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                "description": "Prometheus text format"}})
    app.add_api_route("/v1/sample", sample, methods=["POST"], **model, response_model=ImagesResponse,
                      responses=with_png, summary="new images from z ~ N(0, T^2 I)")
    app.add_api_route("/v1/decode", decode, methods=["POST"], **model, response_model=ImagesResponse,
                      responses=with_png, summary="latents to images")
    app.add_api_route("/v1/encode", encode, methods=["POST"], **model, response_model=EncodeResponse,
                      responses=ERRORS, openapi_extra=images_body,
                      summary="images to q(z|x): mean and log-variance (and a sampled z)")
    app.add_api_route("/v1/reconstruct", reconstruct, methods=["POST"], **model, response_model=ImagesResponse,
                      responses=with_png, openapi_extra=images_body, summary="decode the posterior mean of each image")
    app.add_api_route("/v1/interpolate", interpolate, methods=["POST"], **model, response_model=ImagesResponse,
                      responses=with_png, openapi_extra=image_body(card.image_shape, 2, 2),
                      summary="decoded path between two images' latents (send exactly two images)")
    app.add_api_route("/v1/score", score, methods=["POST"], **model, response_model=ScoreResponse, responses=ERRORS,
                      openapi_extra=images_body, description=SCORE_DESCRIPTION,
                      summary="anomaly score per image (the model's default, or the likelihood in nats), and pixel maps")

    # Middleware, innermost first: the short way for JSON sample/decode, body limit, token, metrics (outermost,
    # so 401s and 413s are counted too).
    routes = {route.path: route for route in app.routes}
    fast = {"/v1/sample": FastRoute(SampleRequest, functools.partial(sample_answer, service), routes["/v1/sample"]),
            "/v1/decode": FastRoute(DecodeRequest, functools.partial(decode_answer, service), routes["/v1/decode"])}
    app.add_middleware(FastJsonRoutes, routes=fast, answer_error=functools.partial(answer_error, service))
    app.add_middleware(BodyLimit, max_body_bytes=options.max_body_bytes,
                       json_limits=json_limits_for(card.image_shape, card.latent_dim, options.max_items))
    if options.token:
        app.add_middleware(RequireToken, token=options.token)
    app.add_middleware(Observe, requests=service.requests, latency=service.latency)
    document_limits(app, card.latent_dim, options.max_items, options.max_score_samples, bool(options.token))
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
