#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, x86-64, no package registry there), fetched here into .whl/
# (ignored by git: carried, never committed) at the versions constraints.txt pins; scripts/gpu-check.sh
# installs them there before it measures.
# The machine already has torch, onnx, onnxscript, onnxruntime (CPU only), numpy, pillow, aiohttp, httpx,
# psutil, prometheus-client, uvloop, h11, anyio and pytest (.library/device/KINDS.md). About 5 MB.
#
#   scripts/gpu-wheels.sh        # then: run(carry=[".whl"], command="scripts/gpu-check.sh")
#
# Not fetched: onnxruntime-gpu (a wheel of about 250 MB; a call carries 64 MiB), so onnxruntime measures the
# CPU there; and MLflow with its dependencies, so the gpu-marked training test is skipped there, named.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PACKAGES=(webdataset braceexpand mlxtend fastapi starlette pydantic pydantic-core annotated-types typing-inspection
          uvicorn httptools orjson python-multipart litserve pyzmq)

pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i "^${name}==" constraints.txt) || { echo "constraints.txt pins no $name" >&2; exit 1; }
    pins+=("$pin")
done
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
