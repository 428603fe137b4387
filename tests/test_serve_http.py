"""The HTTP service as a real uvicorn process on 127.0.0.1, with real onnxruntime behind it."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from serve import ops
from serve.ops import Direct
from tests.conftest import REPO, VENV_BIN, free_port, subprocess_env

pytestmark = pytest.mark.slow
MAX_ITEMS, MAX_BODY = 64, 400_000


class Server:
    """`python -m serve http ...` in a subprocess; `url` once /readyz answers 200."""

    def __init__(self, model, *args: str, token: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = subprocess_env(**({"VAE_SERVE_TOKEN": token} if token else {}))
        env.pop("VAE_SERVE_TOKEN", None) if not token else None
        self.process = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", "serve", "http", "--model", str(model), "--port", str(self.port),
             "--log-level", "warning", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not become ready in 90 s")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read()


@pytest.fixture(scope="module")
def server(exported_model):
    running = Server(exported_model, "--max-queue-delay-ms", "20", "--max-items", str(MAX_ITEMS),
                     "--max-body-bytes", str(MAX_BODY))
    yield running
    output = running.stop()
    assert "Traceback" not in output, output[-3000:]  # no unhandled error in the whole module


@pytest.fixture(scope="module")
def runtime(exported_model):
    from serve.runtime import VAERuntime

    return VAERuntime(exported_model)


@pytest.fixture(scope="module")
def digits(small_shards) -> np.ndarray:
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from pipeline.loader import open_split
    from pipeline.shards import read_shard_images

    val = open_split(str(small_shards), "val")
    images, _ = read_shard_images(val.urls[0], val.manifest.image_shape)
    return nhwc_to_nchw(to_unit_float(images[:16]))


def png_bytes(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.rint(image_chw[0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


# ---------------------------------------------------------------- every endpoint

def test_probes_docs_and_openapi(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
    assert "swagger" in httpx.get(f"{server.url}/docs").text.lower()
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {f"/v1/{name}" for name in ("sample", "decode", "encode", "reconstruct", "interpolate", "score")} <= set(paths)


def test_sample_and_decode_match_the_runtime(server, runtime):
    body = post(server, "/v1/sample", json={"n": 5, "seed": 11, "temperature": 0.9}).json()
    images = np.asarray(body["images"])
    assert body["shape"] == [5, 1, 28, 28] and body["seed"] == 11
    np.testing.assert_allclose(images, Direct(runtime).run(ops.sample, 5, seed=11, temperature=0.9), atol=1e-5)
    z = ops.prior_latents(runtime.card, 3, seed=2)
    decoded = np.asarray(post(server, "/v1/decode", json={"z": z.tolist()}).json()["images"])
    np.testing.assert_allclose(decoded, Direct(runtime).run(ops.decode, z), atol=1e-5)
    unseeded = post(server, "/v1/sample", json={"n": 1}).json()
    assert isinstance(unseeded["seed"], int)  # echoed, so the caller can reproduce it
    grid = post(server, "/v1/sample?format=png", json={"n": 16, "seed": 1})
    assert grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size == (8 * 30 + 2, 2 * 30 + 2)


@pytest.mark.parametrize("path, payload", [
    ("/v1/sample", {"n": 3, "seed": 7, "temperature": 0.5}),
    ("/v1/sample", {"n": "2", "seed": 3}),  # lax coercion alike on both ways
    ("/v1/sample", {"n": 0}),
    ("/v1/sample", {"n": MAX_ITEMS + 1, "seed": 1}),
    ("/v1/sample", {"n": 1, "temperature": float("inf")}),  # json.dumps writes Infinity
    ("/v1/sample", [1, 2]),
    ("/v1/decode", {"z": [[0.25] * 16, [-1.0] * 16]}),
    ("/v1/decode", {"z": [[0.0] * 15]}),
    ("/v1/decode", {"z": []}),
    ("/v1/decode", {"z": [[1e5] * 16]}),
    ("/v1/decode", {"z": "zeros"}),
])
def test_json_bodies_answer_the_same_on_the_short_way_and_through_fastapi(server, path, payload):
    """Plain JSON bodies to /v1/sample and /v1/decode skip FastAPI's machinery (serve.fast_routes); with a query
    string the same request goes FastAPI's way. Both answer byte for byte alike, errors included."""
    content = json.dumps(payload)
    headers = {"content-type": "application/json"}
    short = post(server, path, content=content, headers=headers)
    through_fastapi = post(server, f"{path}?format=json", content=content, headers=headers)
    assert (short.status_code, short.content) == (through_fastapi.status_code, through_fastapi.content)


def test_a_streamed_body_past_the_limit_gets_413_on_the_short_way_too(server):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"n": 1, "pad": "'
        for _ in range(MAX_BODY // 10_000 + 1):
            yield b"x" * 10_000
        yield b'"}'

    def refused() -> float:  # 413s counted under the endpoint so far
        line = 'vae_requests_total{endpoint="/v1/sample",status="413"} '
        return sum(float(row[len(line):]) for row in httpx.get(f"{server.url}/metrics").text.splitlines()
                   if row.startswith(line))

    before = refused()
    for path in ("/v1/sample", "/v1/sample?format=json"):
        response = post(server, path, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "exceeds the limit" in response.text, (path, response.text)
    assert refused() == before + 2


def test_encode_reconstruct_score_take_json_and_png(server, runtime, digits):
    x = digits[:4]
    by_json = post(server, "/v1/encode", json={"images": x.tolist()}).json()
    files = [("files", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(x)]
    by_png = post(server, "/v1/encode", files=files).json()
    posterior = Direct(runtime).run(ops.encode, x)
    mean, logvar = posterior.mean, posterior.logvar
    for body in (by_json, by_png):  # digits are 8-bit already, so PNG is lossless here
        np.testing.assert_allclose(body["mean"], mean, atol=1e-4)
        np.testing.assert_allclose(body["logvar"], logvar, atol=1e-4)
    sampled = post(server, "/v1/encode?sample=true&seed=3", json={"images": x.tolist()}).json()
    np.testing.assert_allclose(sampled["z"], Direct(runtime).run(ops.encode, x).sample(3), atol=1e-4)
    raw = post(server, "/v1/reconstruct", content=png_bytes(x[0]), headers={"content-type": "image/png"}).json()
    np.testing.assert_allclose(raw["images"], Direct(runtime).run(ops.reconstruct, x[:1]), atol=1e-4)
    scores = post(server, "/v1/score?num_samples=8&method=iwae&seed=5", json={"images": x.tolist()}).json()
    np.testing.assert_allclose(scores["scores"], Direct(runtime).run(ops.score, x, 8, "iwae", 5).scores, rtol=1e-4)
    assert scores["method"] == "iwae" and "is_anomaly" not in scores
    assert scores["kind"] == runtime.card.score_statistics.default and "warning" not in scores  # the model's default
    likelihood = post(server, "/v1/score?num_samples=8&seed=5&kind=likelihood", json={"images": x.tolist()}).json()
    np.testing.assert_allclose(likelihood["scores"], Direct(runtime).run(ops.score, x, 8, seed=5, kind="likelihood").scores,
                               rtol=1e-4)
    assert likelihood["kind"] == "likelihood" and min(likelihood["scores"]) > 0  # nats
    corrected = post(server, "/v1/score?num_samples=8&seed=5&complexity=png", json={"images": x.tolist()}).json()
    np.testing.assert_allclose(corrected["scores"], Direct(runtime).run(ops.score, x, 8, "elbo", 5, complexity="png").scores,
                               rtol=1e-4)
    assert corrected["complexity"] == "png" and corrected["kind"] == "likelihood"
    # pixel maps: base64 heat-map PNGs, or the values, the same the command line computes
    expected = Direct(runtime).run(ops.score, x, 2, "elbo", 1, maps=True).maps
    as_png = post(server, "/v1/score?num_samples=2&seed=1&maps=png", json={"images": x.tolist()}).json()["maps"]
    as_json = post(server, "/v1/score?num_samples=2&seed=1&maps=json", json={"images": x.tolist()}).json()["maps"]
    assert len(as_png) == len(as_json) == len(x)
    for png_map, json_map, values in zip(as_png, as_json, expected):
        heat = Image.open(io.BytesIO(base64.b64decode(png_map["png"])))
        assert heat.size == (28, 28) and heat.mode == "RGB"
        np.testing.assert_allclose(json_map["nats"], values, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([png_map["sum_nats"], png_map["max_nats"]], [values.sum(), values.max()], rtol=1e-4)
    assert "maps" not in corrected


def test_one_limit_refuses_alike_over_http_and_on_the_command_line(server, exported_model, small_shards, tmp_path,
                                                                   capsys):
    """The latent magnitude limit lives in serve.ops: /v1/decode and `serve traverse` refuse with the same words."""
    from serve.__main__ import main

    response = post(server, "/v1/decode", json={"z": [[2e4] + [0.0] * 15]})
    assert response.status_code == 422
    assert main(["traverse", "--model", str(exported_model), "--input", str(small_shards), "--range", "-20000",
                 "20000", "--out", str(tmp_path / "t.png")]) == 1
    assert response.json()["detail"] in capsys.readouterr().err
    assert response.json()["detail"] == "z: values must lie within +-10000, got 2e+04"


def test_interpolation_decodes_real_digits_to_valid_images(server, runtime, digits):
    pair = {"images": digits[:2].tolist()}
    for mode in ("linear", "slerp"):
        body = post(server, f"/v1/interpolate?steps=6&mode={mode}", json=pair).json()
        path = np.asarray(body["images"])
        assert path.shape == (6, 1, 28, 28) and np.isfinite(path).all() and 0 <= path.min() and path.max() <= 1
        np.testing.assert_allclose(path, Direct(runtime).run(ops.interpolate, digits[:2], 6, mode), atol=1e-4)
    strip = post(server, "/v1/interpolate?steps=8&format=png",
                 files=[("a", ("a.png", png_bytes(digits[2]), "image/png")),
                        ("b", ("b.png", png_bytes(digits[3]), "image/png"))])
    assert strip.status_code == 200 and Image.open(io.BytesIO(strip.content)).size == (8 * 30 + 2, 32)


# ---------------------------------------------------------------- batching

def test_concurrent_requests_are_batched_and_give_the_same_answers(server, digits):
    def sample(seed):
        return np.asarray(post(server, "/v1/sample", json={"n": 2, "seed": seed}).json()["images"])

    def score(i):
        return np.asarray(post(server, "/v1/score?num_samples=2&seed=1", json={"images": digits[i:i + 3].tolist()}).json()["scores"])

    alone = [sample(seed) for seed in range(12)] + [score(i) for i in range(12)]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(sample, range(12))) + list(pool.map(score, range(12)))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    buckets = {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('vae_batch_size_bucket{graph="decoder"')}
    assert buckets["+Inf"] > buckets["2.0"], "no decoder batch ever held more than one request"


def test_metrics_expose_requests_latency_batches_and_queue(server):
    post(server, "/v1/sample", json={"n": 1})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ('vae_requests_total{endpoint="/v1/sample",status="200"}', "vae_request_latency_seconds_bucket",
                 'vae_batch_size_bucket{graph="encoder"', 'vae_queue_depth{graph="decoder"}'):
        assert name in text, name


# ---------------------------------------------------------------- bad input

NAN_BODY = json.dumps({"images": [[[[0.5] * 28] * 27 + [[float("nan")] * 28]]]})


@pytest.mark.parametrize("path, kwargs, status, message", [
    ("/v1/encode", {"json": {"images": [[[[0.5] * 28] * 28] * 3]}}, 422, "expected 1 channel, got 3"),
    ("/v1/encode", {"json": {"images": [[[[0.5] * 20] * 28]]}}, 422, "expected 28x28 images"),
    ("/v1/encode", {"json": {"images": [[0.5] * 28]}}, 422, "expected images of shape"),
    ("/v1/encode", {"json": {"images": [[[["a"] * 28] * 28]]}}, 422, "expected numbers, got strings"),
    ("/v1/encode", {"json": {"images": [[[[True] * 28] * 28]]}}, 422, "got booleans"),
    ("/v1/encode", {"json": {"images": [[[[0.5] * 28] * 28, [[0.5] * 27] * 28]]}}, 422, "not a rectangular array"),
    ("/v1/encode", {"content": NAN_BODY, "headers": {"content-type": "application/json"}}, 422, "NaN or Inf"),
    ("/v1/score", {"json": {"images": [[[[2.0] * 28] * 28]]}}, 422, "must lie in [0, 1]"),
    ("/v1/encode", {"json": {"images": [[[[0.5] * 28] * 28]] * (MAX_ITEMS + 1)}}, 413, "too many images"),
    ("/v1/sample", {"json": {"n": MAX_ITEMS + 1}}, 413, "too many images"),
    ("/v1/sample", {"json": {"n": 0}}, 422, "greater than or equal to 1"),
    ("/v1/sample", {"json": {"n": 2, "temperature": "hot"}}, 422, "temperature"),
    ("/v1/decode", {"json": {"z": [[0.0] * 15]}}, 422, "expected latents of shape (B, 16)"),
    ("/v1/decode", {"content": '{"z": [[Infinity' + ", 0" * 15 + "]]}", "headers": {"content-type": "application/json"}},
     422, "NaN or Inf"),
    ("/v1/encode", {"content": b"x" * (MAX_BODY + 1), "headers": {"content-type": "application/json"}}, 413,
     "exceeds the limit"),
    ("/v1/reconstruct", {"content": b"\x89PNG not really", "headers": {"content-type": "image/png"}}, 422,
     "undecodable image"),
    ("/v1/reconstruct", {"files": [("f", ("big.png", None, "image/png"))]}, 422, "expected 28x28 pixels"),
    ("/v1/encode", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("/v1/encode", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported Content-Type"),
    ("/v1/encode", {"files": {"note": (None, "just a field")}}, 422, "holds no files"),
    ("/v1/interpolate", {"json": {"images": [[[[0.5] * 28] * 28]]}}, 422, "exactly 2 images"),
    ("/v1/interpolate?steps=1", {"json": {"images": [[[[0.5] * 28] * 28]] * 2}}, 422, "greater than or equal to 2"),
    ("/v1/score?num_samples=65", {"json": {"images": [[[[0.5] * 28] * 28]]}}, 422, "num_samples=65"),
    ("/v1/score?method=mse", {"json": {"images": [[[[0.5] * 28] * 28]]}}, 422, "elbo"),
    ("/v1/score?kind=png_mse&complexity=png", {"json": {"images": [[[[0.5] * 28] * 28]]}}, 422,
     "complexity='png' applies to kind='likelihood' only"),
    ("/v1/score?kind=pca", {"json": {"images": [[[[0.5] * 28] * 28]]}}, 422, "likelihood"),
])
def test_bad_input_gets_4xx_naming_the_problem(server, path, kwargs, status, message):
    if "files" in kwargs and isinstance(kwargs["files"], list) and kwargs["files"][0][1][1] is None:
        buffer = io.BytesIO()
        Image.new("L", (32, 32)).save(buffer, format="PNG")
        kwargs = {"files": [("f", ("big.png", buffer.getvalue(), "image/png"))]}
    response = post(server, path, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.text, response.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # and the service keeps serving


def strategy_for(schema: dict):
    """A hypothesis strategy for the JSON-schema subset FastAPI emits here (a small, bounded generator)."""
    from hypothesis import strategies as st

    if "anyOf" in schema:
        return st.one_of([strategy_for(option) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**70)) - 2,
                           min(schema.get("maximum", 2**70), schema.get("exclusiveMaximum", 2**70)) + 2)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | st.floats(-2, 2)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=8)
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(strategy_for(schema.get("items", {})), max_size=4)
    if kind == "object" and "properties" in schema:
        properties = {name: strategy_for(sub) for name, sub in schema["properties"].items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: v for k, v in properties.items() if k in required},
                                     optional={k: v for k, v in properties.items() if k not in required})
    return st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=4),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                        max_leaves=8)


def test_fuzzing_the_openapi_schema_finds_no_5xx(server):
    """Bodies and query strings drawn from the service's own OpenAPI schema (hypothesis): never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    spec = httpx.get(f"{server.url}/openapi.json").json()

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(spec["components"]["schemas"][node["$ref"].split("/")[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    client = httpx.Client(base_url=server.url, timeout=60)
    checked = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            body_schema = resolve(operation.get("requestBody", {}).get("content", {})
                                  .get("application/json", {}).get("schema", {}))
            params = {p["name"]: strategy_for(resolve(p["schema"])) for p in operation.get("parameters", [])
                      if p["in"] == "query"}
            query = st.fixed_dictionaries({}, optional=params)
            body = st.one_of(strategy_for(body_schema), st.binary(max_size=64))

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(query=query, payload=body)
            def check(query, payload):
                # json.dumps writes Infinity/NaN (httpx's json= refuses them): the service must 4xx them
                kwargs = ({"content": payload} if isinstance(payload, bytes) else
                          {"content": json.dumps(payload), "headers": {"content-type": "application/json"}})
                response = client.request(method.upper(), path, params=query, **kwargs)
                assert response.status_code < 500, (method, path, query, response.status_code, response.text)

            check()
            checked.append(path)
    assert len(checked) >= 9
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


# ---------------------------------------------------------------- auth, queue full, shutdown

def test_token_queue_full_and_graceful_shutdown(exported_model):
    token = "s3cret-token"
    busy = Server(exported_model, "--max-batch-size", "1", "--max-queue", "2", "--max-queue-delay-ms", "0",
                  "--max-items", "256", token=token)
    try:
        auth = {"Authorization": f"Bearer {token}"}
        assert post(busy, "/v1/sample", json={"n": 1}).status_code == 401
        assert post(busy, "/v1/sample", json={"n": 1}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{busy.url}/metrics").status_code == 401
        assert httpx.get(f"{busy.url}/healthz").status_code == 200  # probes stay open
        assert httpx.get(f"{busy.url}/openapi.json").status_code == 200
        assert post(busy, "/v1/sample", json={"n": 1}, headers=auth).status_code == 200
        assert httpx.get(f"{busy.url}/metrics", headers=auth).status_code == 200
        unauthorized = post(busy, "/v1/score", json={"images": []})
        assert unauthorized.status_code == 401 and unauthorized.headers["WWW-Authenticate"] == "Bearer"
        assert "VAE_SERVE_TOKEN" in unauthorized.json()["detail"]  # refused before the body is even read
        schema = httpx.get(f"{busy.url}/openapi.json").json()  # the docs say which endpoints need the token
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert schema["paths"]["/v1/sample"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]

        # 40 clients at once against a queue of 2: some are turned away with 503 + Retry-After
        with ThreadPoolExecutor(40) as pool:
            responses = list(pool.map(lambda i: post(busy, "/v1/sample", json={"n": 256, "seed": i}, headers=auth),
                                      range(40)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0, statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["Retry-After"] == "1" and "busy" in rejected.json()["detail"]
        assert post(busy, "/v1/sample", json={"n": 1}, headers=auth).status_code == 200  # serving again
    finally:
        busy.stop()

    # a request waiting for its batch (up to 3 s) when SIGTERM arrives still gets its answer
    slow = Server(exported_model, "--max-queue-delay-ms", "3000", "--max-batch-size", "64")
    result = {}
    thread = threading.Thread(target=lambda: result.update(response=post(slow, "/v1/sample", json={"n": 1, "seed": 0})))
    thread.start()
    time.sleep(1.0)
    slow.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert result["response"].status_code == 200 and len(result["response"].json()["images"]) == 1
    # uvicorn re-raises the captured SIGTERM once shutdown is complete, so -15 is a clean exit too
    assert slow.process.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in slow.process.stdout.read()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{slow.url}/healthz", timeout=2)
