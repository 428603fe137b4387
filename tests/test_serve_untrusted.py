"""serve against untrusted input (issue 12): hostile model directories, image bombs, deep JSON, slow and
oversized requests, clients that vanish, and an OpenAPI document that must say what the service answers.

Real things throughout: copies of a real export, onnxruntime, `python -m serve http` processes on 127.0.0.1
and raw sockets.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serve.json_limits import JsonLimits, JsonTooComplex, check_json_structure
from export.model_card import ModelDirError
from serve import ops
from serve.ops import Direct
from serve.runtime import NonFiniteOutput, VAERuntime
from tests.conftest import REPO, VENV_BIN, subprocess_env
from tests.test_serve_http import Server, post

pytestmark = pytest.mark.slow  # real server processes

# ---------------------------------------------------------------- hostile model directories (item 13)


def copy_model(exported_model: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the export with model.json keys replaced (None removes a key)."""
    model = tmp_path / "model"
    shutil.copytree(exported_model, model)
    metadata = json.loads((model / "model.json").read_text())
    for key, value in changes.items():
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    (model / "model.json").write_text(json.dumps(metadata))
    return model


def write_decoder(path: Path, latent_dim: int, image_shape, offset: float) -> None:
    """A decoder graph image = sigmoid(logits), logits = W sqrt(z + offset): NaN wherever z < -offset."""
    channels, height, width = image_shape
    weights = np.full((latent_dim, channels * height * width), 0.01, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["z", "offset"], ["shifted"]),
         helper.make_node("Sqrt", ["shifted"], ["root"]),
         helper.make_node("MatMul", ["root", "weights"], ["flat"]),
         helper.make_node("Reshape", ["flat", "shape"], ["params"]),
         helper.make_node("Sigmoid", ["params"], ["image"])],
        "nan_decoder",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent_dim])],
        [helper.make_tensor_value_info("params", TensorProto.FLOAT, ["batch", channels, height, width]),
         helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, height, width])],
        [numpy_helper.from_array(np.float32(offset).reshape(1), "offset"),
         numpy_helper.from_array(weights, "weights"),
         numpy_helper.from_array(np.array([-1, channels, height, width], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def nan_model(exported_model: Path, tmp_path: Path, offset: float) -> Path:
    model = copy_model(exported_model, tmp_path)
    metadata = json.loads((model / "model.json").read_text())
    write_decoder(model / metadata["decoder"]["file"], metadata["latent_dim"], metadata["image_shape"], offset)
    return model


@pytest.mark.parametrize("changes, message", [
    ({"latent_dim": 32}, "input 'z' has shape (batch, 16), model.json says (batch, 32)"),
    ({"latent_dim": 10**9}, "latent_dim: expected an integer in [1, 65536], got 1000000000"),
    ({"latent_dim": "16"}, "latent_dim: expected an integer"),
    ({"image_shape": [1, 32, 32]}, "model.json says (batch, 1, 32, 32)"),
    ({"image_shape": "1x28x28"}, "image_shape: expected [C, H, W]"),
    ({"likelihood": "poisson"}, "likelihood: expected one of"),
    ({"likelihood": "gaussian", "likelihood_params": {"sigma": -0.5}}, "sigma: the gaussian likelihood needs a number > 0"),
    ({"likelihood_params": {"bin_width": float("nan")}}, "expected finite numbers"),
    ({"encoder": {"file": "../encoder.onnx"}}, "'../encoder.onnx' is not a plain file name"),
    ({"decoder": {"file": "/etc/hostname"}}, "is not a plain file name"),
    ({"decoder": {"file": "missing.onnx"}}, "'missing.onnx' is not a file in"),
    ({"variants": {"fp16": {"encoder": {"file": "encoder.onnx"}, "decoder": {"file": "../../etc/passwd"}}}},
     "variants.fp16.decoder: '../../etc/passwd' is not a plain file name"),
    ({"encoder": None}, "encoder: expected a file name"),
    ({"anomaly_score": {"default": "png_mse", "num_images": 9, "num_samples": 1, "means": {"recon_mse": 1.0},
                        "stds": {"recon_mse": 0.0}}},
     "anomaly_score: stds.recon_mse: expected a finite number > 0, got 0.0; default 'png_mse' needs statistics"),
    ({"anomaly_score": {"default": "__import__('os')", "num_images": 9, "num_samples": 1,
                        "means": {"recon_mse": float("nan"), "/etc/passwd": 1}, "stds": {"recon_mse": 1}}},
     "unknown scores ['/etc/passwd']"),
    ({"anomaly_score": {"default": "excess_mse", "num_images": True, "num_samples": 1, "means": [], "stds": {}}},
     "anomaly_score: expected {'means': {...}, 'stds': {...}}"),
    ({"anomaly_score": "png_mse"}, "anomaly_score: expected an object, got str"),
])
def test_a_model_directory_that_does_not_match_model_json_is_refused_at_load(exported_model, tmp_path, changes,
                                                                              message):
    model = copy_model(exported_model, tmp_path, **changes)
    with pytest.raises(ModelDirError) as refused:
        VAERuntime(model)
    assert message in str(refused.value), str(refused.value)


def test_a_symlink_out_of_the_model_directory_is_refused(exported_model, tmp_path):
    model = copy_model(exported_model, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(model / "decoder.onnx", outside)
    (model / "decoder-link.onnx").symlink_to(outside)
    metadata = json.loads((model / "model.json").read_text())
    metadata["decoder"]["file"] = "decoder-link.onnx"
    (model / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelDirError, match="points outside the model directory"):
        VAERuntime(model)


def test_a_decoder_that_emits_nan_is_refused_at_load_and_serve_http_does_not_start(exported_model, tmp_path):
    model = nan_model(exported_model, tmp_path, offset=-100.0)  # NaN for every z the prior gives
    with pytest.raises(ModelDirError, match="self-check.*'params' holds NaN or Inf"):
        VAERuntime(model)
    started = subprocess.run([str(VENV_BIN / "python"), "-m", "serve", "http", "--model", str(model), "--port", "0"],
                             cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert started.returncode == 1 and "fails its self-check" in started.stderr, started.stderr[-2000:]
    assert "Traceback" not in started.stderr


def test_non_finite_outputs_are_a_500_with_a_message_and_a_metric_never_null_pixels(exported_model, tmp_path):
    model = nan_model(exported_model, tmp_path, offset=100.0)  # finite near the prior, NaN for z < -100
    runtime = VAERuntime(model)
    with pytest.raises(NonFiniteOutput, match="holds NaN or Inf in 1 of 2 rows"):
        Direct(runtime).run(ops.decode, np.array([[0.0] * 16, [-150.0] * 16], np.float32))
    server = Server(model)
    try:
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
        assert post(server, "/v1/decode", json={"z": [[0.0] * 16]}).status_code == 200
        for path in ("/v1/decode", "/v1/decode?format=json"):  # the short way and FastAPI's
            broken = post(server, path, json={"z": [[-150.0] * 16]})
            assert broken.status_code == 500 and "NaN or Inf" in broken.json()["detail"], broken.text
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'vae_nonfinite_outputs_total{graph="decoder"} 2.0' in metrics
        assert post(server, "/v1/decode", json={"z": [[0.5] * 16]}).status_code == 200  # and serving on
    finally:
        server.stop()


# ---------------------------------------------------------------- image bombs (item 5)

def png_declaring(width: int, height: int) -> bytes:
    """A real, complete grey PNG of width x height zeros: a few hundred KB that decodes to width*height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    return png_declaring(4000, 4000)  # within Pillow's and decode_image's defaults; 16 MB of pixels


def test_the_cli_refuses_an_image_far_larger_than_the_model_from_its_header(exported_model, tmp_path, png_bomb):
    from serve.__main__ import main

    (tmp_path / "bomb.png").write_bytes(png_bomb)
    runtime = VAERuntime(exported_model)
    with pytest.raises(ValueError, match=r"declares 4000x4000 pixels, more than the 3,136 allowed"):
        ops.image_from_bytes(runtime.card, png_bomb)
    assert main(["score", "--model", str(exported_model), "--input", str(tmp_path / "bomb.png"),
                 "--out", str(tmp_path / "scores.csv")]) == 1
    assert not (tmp_path / "scores.csv").exists()


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@pytest.fixture(scope="module")
def server(exported_model):
    """Default limits (16 MiB bodies, 256 items), short deadlines for the socket tests."""
    running = Server(exported_model, "--header-timeout-s", "1", "--body-timeout-s", "1", "--keep-alive-timeout-s", "1",
                     "--max-header-bytes", "4096", "--max-headers", "20", "--max-connections", "40")
    yield running
    output = running.stop()
    assert "Traceback" not in output, output[-3000:]


def test_http_refuses_image_bombs_at_header_time(server, png_bomb):
    peak = peak_rss_mb(server.process.pid)
    for kwargs in ({"content": png_bomb, "headers": {"content-type": "image/png"}},
                   {"files": [("a", ("a.png", png_bomb, "image/png"))]}):
        refused = post(server, "/v1/encode", **kwargs)
        assert refused.status_code == 413, refused.text
        assert "declares 4000x4000 pixels" in refused.json()["detail"]
    assert peak_rss_mb(server.process.pid) - peak < 12  # the 16 MB of pixels were never decoded
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# ---------------------------------------------------------------- JSON bodies (item 11)

@pytest.mark.parametrize("path", ["/v1/encode", "/v1/decode", "/v1/decode?format=json", "/v1/sample"])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(server, path):
    key = "images" if "encode" in path else "z"
    body = '{"%s": %s1%s}' % (key, "[" * 2000, "]" * 2000)
    refused = post(server, path, content=body, headers={"content-type": "application/json"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["detail"] == "JSON body nests 2001 levels deep; at most 5 are accepted"


def test_brackets_inside_strings_do_not_count_as_nesting(server):
    tricky = post(server, "/v1/decode", content='{"note": "]]]]]]]]]]", "z": [[0.5' + ", 0.5" * 15 + "]]}",
                  headers={"content-type": "application/json"})
    assert tricky.status_code == 200, tricky.text
    # read as a closing quote, the escaped one would pair the others so that the brackets looked like a string
    hidden = '{"a": "\\"", "z": %s0%s, "b": "x"}' % ("[" * 40, "]" * 40)
    assert json.loads(hidden)["a"] == '"'
    refused = post(server, "/v1/decode", content=hidden, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "nests 41 levels" in refused.text, refused.text


LIMITS = JsonLimits(max_depth=5, max_containers=100, max_values=1000)


@pytest.mark.parametrize("body, refusal", [
    (b'{"images": [[[[0.5, 1]]]]}', None),
    (b'{"images": [[[[[0.5]]]]]}', "nests 6 levels deep"),
    (b'{"k": "[[[[[[[[", "images": [[[[0]]]]}', None),  # brackets in strings are text
    (b'{"k": "\\\\", "z": [[[[[[0]]]]]]}', "nests 7 levels deep"),  # an escaped backslash ends no string early
    (b'{"a": "\\"", "z": [[[[[[0]]]]]], "b": "x"}', "nests 7 levels deep"),  # an escaped quote opens none
    (b"[" + b"[]," * 200 + b"[]]", "202 arrays and objects; at most 100"),
    (b"[" + b"0," * 2000 + b"0]", "2,001 values; at most 1,000"),
    (b"[1}", None),  # malformed, not too big: the parser reports it
])
def test_json_structure_is_measured_before_parsing(body, refusal):
    json.loads(body) if refusal is None and body != b"[1}" else None  # the accepted ones are real JSON
    if refusal is None:
        check_json_structure(body, LIMITS)
    else:
        with pytest.raises(JsonTooComplex, match=re.escape(refusal)):
            check_json_structure(body, LIMITS)


def test_a_body_of_millions_of_empty_lists_is_refused_before_parsing(server):
    body = b'{"images": [' + b"[]," * 5_000_000 + b"[]]}"  # 15 MB, under the 16 MiB body limit
    peak = peak_rss_mb(server.process.pid)
    refused = post(server, "/v1/encode", content=body, headers={"content-type": "application/json"})
    assert refused.status_code == 413 and "at most 401,440 values" in refused.json()["detail"], refused.text
    assert peak_rss_mb(server.process.pid) - peak < 100  # parsing it cost 500 MB


# ---------------------------------------------------------------- connections (item 12)

def raw_connection(server, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return received
        if not data:
            return received
        received += data


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body may arrive in separate reads)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return received


def test_serve_http_has_connection_limit_flags_with_defaults():
    from serve.__main__ import build_parser

    args = build_parser().parse_args(["http", "--model", "m"])
    assert (args.max_header_bytes, args.max_headers, args.header_timeout_s, args.body_timeout_s,
            args.keep_alive_timeout_s, args.max_connections) == (16384, 100, 10.0, 30.0, 5, 1000)


def test_an_oversized_request_head_gets_431(server):
    with raw_connection(server) as sock:  # --max-header-bytes 4096
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 6000 + b"\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"request head exceeds 4096 bytes" in answer
    with raw_connection(server) as sock:  # a 10 MB header is cut off long before it is all sent
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent = 0
        with pytest.raises(OSError):
            while sent < 10_000_000:
                sock.sendall(b"a" * 10_000)
                sent += 10_000
    assert sent < 5_000_000
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_too_many_headers_get_431(server):
    with raw_connection(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(30)) + b"\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"more than 20 headers" in answer
    ok = httpx.get(f"{server.url}/healthz", headers={f"x-{i}": "1" for i in range(15)})
    assert ok.status_code == 200  # a head within the limits is served


def test_slow_and_silent_clients_are_disconnected(server):
    silent = [raw_connection(server) for _ in range(30)]  # never send a byte
    slow_head = raw_connection(server)
    slow_head.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # and never finish the head
    slow_body = raw_connection(server)
    slow_body.sendall(b"POST /v1/decode HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"z\": [[")
    try:
        for sock in [*silent, slow_head]:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 "), "a silent or slow client was kept"
        assert read_until_closed(slow_body).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in [*silent, slow_head, slow_body]:
            sock.close()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'vae_requests_total{endpoint="/v1/decode",status="408"} 1.0' in metrics


def test_idle_keep_alive_connections_are_closed_and_busy_ones_serve(server):
    with raw_connection(server) as sock:
        for _ in range(3):  # one connection, several requests
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        assert read_until_closed(sock) == b""  # closed after --keep-alive-timeout-s, without an answer


def test_connections_past_max_connections_get_503(server):
    held = [raw_connection(server) for _ in range(45)]  # --max-connections 40
    try:
        with raw_connection(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in held:
            sock.close()


# ---------------------------------------------------------------- contract and observability (item 14)

def counted(server, endpoint: str, status: int) -> float:
    line = f'vae_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    return sum(float(row[len(line):]) for row in httpx.get(f"{server.url}/metrics").text.splitlines()
               if row.startswith(line))


@pytest.mark.parametrize("path, endpoint", [("/v1/encode", "/v1/encode"), ("/v1/decode", "/v1/decode"),
                                            ("/v1/decode?format=json", "/v1/decode")])
def test_a_client_that_disconnects_mid_body_is_counted_499_not_500(server, path, endpoint):
    before = {status: counted(server, endpoint, status) for status in (400, 499, 500)}
    with raw_connection(server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: 10000\r\n\r\n".encode() + b'{"z": [[0.5, ')
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while counted(server, endpoint, 499) == before[499] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted(server, endpoint, 499) == before[499] + 1
    assert counted(server, endpoint, 500) == before[500] and counted(server, endpoint, 400) == before[400]


@pytest.mark.parametrize("z", [[[True] * 16], [["0.5"] * 16], [[0.5] * 15 + [False]]])
def test_decode_takes_json_numbers_only_as_encode_does(server, z):
    for path in ("/v1/decode", "/v1/decode?format=json"):
        refused = post(server, path, json={"z": z})
        assert refused.status_code == 422, refused.text
    assert post(server, "/v1/decode", json={"z": [[0] * 16]}).status_code == 200  # integers are numbers


def test_the_openapi_document_matches_the_answers(server):
    """schemathesis (bounded: fixed seed, few examples per operation) against the running service: every
    answer's status, Content-Type and body must be the ones /openapi.json documents, and none a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, seed, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)

    # What the document promises about answers. (Not positive_data_acceptance: a schema cannot say "a decodable
    # PNG" or "images x num_samples within the decoder's row limit", so some schema-valid requests get 4xx.)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = []

    @seed(12)
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy())
    def check(case):
        try:
            case.call_and_validate(checks=checks, timeout=30)
        except AssertionError as failure:  # collect rather than shrink: a few seconds, a full report
            failures.append(f"{case.method} {case.formatted_path}: {str(failure)[:400]}")

    check()
    assert not failures, "\n".join(failures[:10])
