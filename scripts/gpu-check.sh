#!/usr/bin/env bash
# The GPU measurements in one go, for a session lent a GPU machine: the `gpu`-marked tests, bench/inference.py,
# bench/generate.py -n 1000000 and bench/serve_load.py, within BUDGET_S (10 minutes), each step under its own
# timeout, their JSON and one log under $OUT. Without an NVIDIA GPU (a CPU machine) the same steps run at tiny
# sizes, GPU parts are skipped and the output says so.
#
#   scripts/gpu-check.sh                       # results in $OUT (default: out/gpu-check in the repo)
#   MODEL=out/model STEPS=generate,serve_load BUDGET_S=600 PYTHON=.venv/bin/python scripts/gpu-check.sh
#
# MODEL: an exported model directory for generate and serve_load; default out/model when it exists, else the
# default architecture (untrained: speed does not depend on the weights) that the inference step exports.
# Wheels in .whl/ (carried to a machine with no registry: .library/device/README.md) are installed first into
# a folder of their own on PYTHONPATH. Exit status: 0 when every step that ran passed (skips pass).
set -uo pipefail  # not -e: one failing step must not stop the others

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=$(realpath -m "${OUT:-$REPO/out/gpu-check}")
BUDGET_S=${BUDGET_S:-600}
STEPS=${STEPS:-tests,inference,generate,serve_load}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
SCRATCH=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
exec > >(tee "$OUT/gpu-check.log") 2>&1
started=$SECONDS
summary=()
failed=0

if nvidia-smi -L >/dev/null 2>&1; then
    gpu=1
    echo "GPU: $(nvidia-smi -L | head -1)"
else
    gpu=0
    echo "no NVIDIA GPU here: GPU parts are skipped (the gpu tests skip themselves, onnxruntime and torch stay"
    echo "on the CPU) and every step runs at a tiny size"
fi

# The wheels scripts/gpu-wheels.sh fetches are for the lent machine's Python (3.12): used there only.
if [[ $gpu == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels from .whl/ into $SCRATCH/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}:$SCRATCH/site" PYTHONUNBUFFERED=1
providers=$("$PYTHON" -c "import onnxruntime as o; print(','.join(o.get_available_providers()))" 2>/dev/null)
echo "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)'); onnxruntime providers: ${providers:-none (not installed)}"
if [[ $gpu == 1 && $providers != *CUDAExecutionProvider* ]]; then
    echo "WARNING: this onnxruntime has no CUDA provider (install onnxruntime-gpu): its figures are CPU figures"
fi

if [[ $gpu == 1 ]]; then
    inference_args=(--batch 1,64,1024)
    generate_args=(-n 1000000 --batch 4096 --formats npy --repeats 1)
    load_args=(--clients 32,128 --seconds 10)
else
    inference_args=(--batch 1,64 --rounds 1 --round-s 0.05)
    generate_args=(-n 2000 --batch 512 --formats npy --repeats 1)
    load_args=(--clients 4 --seconds 1 --ceiling-seconds 0.5 --no-litserve)  # LitServe alone starts in minutes here
fi

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

missing_modules() {  # the modules of "$@" that this Python cannot import
    "$PYTHON" -c "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" "$@"
}

# step NAME TIMEOUT_S "MODULES" COMMAND...: run COMMAND under min(TIMEOUT_S, what is left of the budget)
step() {
    local name=$1 limit=$2 modules=$3
    shift 3
    wanted "$name" || return 0
    local left=$((BUDGET_S - (SECONDS - started))) missing
    missing=$(missing_modules $modules)
    if [[ -n $missing ]]; then
        summary+=("$name: SKIPPED, cannot import: $missing"); echo "== $name: SKIPPED, cannot import: $missing"; return 0
    fi
    if ((left < 30)); then
        summary+=("$name: SKIPPED, the ${BUDGET_S} s budget is spent"); echo "== $name: SKIPPED (budget spent)"; return 0
    fi
    local timeout_s=$((limit < left ? limit : left)) begun=$SECONDS rc
    echo "== $name (timeout ${timeout_s} s): $*"
    timeout --kill-after=15 "$timeout_s" "$@"
    rc=$?
    local took=$((SECONDS - begun))
    case $rc in
        0) summary+=("$name: ok in ${took} s") ;;
        124 | 137) summary+=("$name: TIMED OUT after ${took} s"); failed=1 ;;
        *) summary+=("$name: FAILED (exit $rc) after ${took} s"); failed=1 ;;
    esac
}

gpu_test_files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
step tests 120 "pytest torch webdataset mlxtend mlflow" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu --junitxml="$OUT/gpu-tests.xml" \
    --basetemp="$SCRATCH/pytest" $gpu_test_files

MODEL=${MODEL:-}
if [[ -z $MODEL && -f out/model/model.json ]]; then MODEL=out/model; fi
keep=()
if [[ -z $MODEL ]]; then keep=(--keep-model "$SCRATCH/model"); fi
step inference 150 "torch onnx onnxruntime onnxscript" \
    "$PYTHON" bench/inference.py "${inference_args[@]}" --out "$OUT/inference.json" "${keep[@]}"
if [[ -z $MODEL && -f $SCRATCH/model/model.json ]]; then MODEL=$SCRATCH/model; fi

if [[ -z $MODEL ]]; then
    for name in generate serve_load; do
        wanted $name && summary+=("$name: SKIPPED, no model (set MODEL, or let the inference step export one)")
    done
else
    echo "model: $MODEL"
    step generate 150 "onnxruntime numpy PIL" \
        "$PYTHON" bench/generate.py --model "$MODEL" "${generate_args[@]}" --out "$OUT/generate.json"
    step serve_load 170 "onnxruntime fastapi uvicorn orjson httpx aiohttp psutil" \
        "$PYTHON" bench/serve_load.py --model "$MODEL" "${load_args[@]}" --out "$OUT/serve_load.json"
fi

echo "== summary ($((SECONDS - started)) s of ${BUDGET_S}; $([[ $gpu == 1 ]] && echo GPU || echo 'no GPU: tiny sizes'))"
printf '  %s\n' "${summary[@]}"
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $failed
