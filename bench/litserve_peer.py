"""LitServe (PyPI `litserve`) serving our decoder.onnx: the peer bench/serve_load.py measures beside our service.

    python bench/litserve_peer.py --model out/model --port 8001 [--max-batch-size 64 --batch-timeout-ms 2]

`POST /v1/sample {"n": 1, "seed": k}` answers `{"images": [...], "shape": [1, C, H, W]}` like our service,
through LitServe's own dynamic batching (`max_batch_size`, `batch_timeout`) and at its best: one inference
worker running the same onnxruntime session options as our service (`serve.runtime`, idle threads not
spinning), only the `image` output computed, and answers serialised by orjson into a ready Response (no
FastAPI encoding of a dict). The latents are drawn as `serve.ops.prior_latents` draws them. Only n=1 is
taken (what the load sends): batching stacks one latent per request. Readiness: GET /health.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls
import numpy as np
import orjson
from fastapi import HTTPException
from fastapi.responses import Response

from export.model_card import METADATA_FILE, has_model_card
from serve.ops import prior_latents
from serve.runtime import RuntimeOptions, VAERuntime, parse_providers

BATCH_ROWS = 512  # rows per decoder call, as bench.serve_load.batcher_ceiling and the service use


class DecoderAPI(ls.LitAPI):
    """One latent per request in, one image per request out; LitServe batches the latents."""

    def __init__(self, model_dir: str, providers: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir, self.providers = model_dir, providers

    def setup(self, device) -> None:
        self.runtime = VAERuntime(self.model_dir, options=RuntimeOptions(
            providers=parse_providers(self.providers), spinning=False))
        self.shape = [1, *self.runtime.image_shape]

    def decode_request(self, request: dict) -> np.ndarray:
        if request.get("n", 1) != 1:
            raise HTTPException(422, f"this peer answers n=1 only, got n={request.get('n')!r}")
        return prior_latents(self.runtime.card, 1, int(request.get("seed", 0)))[0]

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, z: np.ndarray) -> np.ndarray:
        return self.runtime.decoder.run(z, ["image"], BATCH_ROWS)[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, image: np.ndarray) -> Response:
        return Response(orjson.dumps({"images": image[None], "shape": self.shape}, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--providers", default="tensorrt,cuda,cpu")
    args = parser.parse_args()
    if not has_model_card(args.model):
        parser.error(f"--model {args.model}: no {METADATA_FILE} there")
    api = DecoderAPI(args.model, args.providers, max_batch_size=args.max_batch_size,
                     batch_timeout=args.batch_timeout_ms / 1000.0, api_path="/v1/sample")
    # accelerator "cpu" whatever the providers: LitServe's device only picks what setup() is told; onnxruntime
    # chooses the GPU itself. One worker, like our service's one decoder session.
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
