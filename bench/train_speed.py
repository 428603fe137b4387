"""Training throughput: `torchrun -m train` vs a bare loop over in-memory tensors (same model,
batch and optimizer), 1 vs 2 processes, fp32 vs bf16.

The bare loop is the ceiling: forward, backward, AdamW step on a fixed uint8 tensor moved to
float each step, nothing else. The trainer adds the data pipeline (shards, one loader worker),
EMA, dynamic binarisation, the per-step stop flag and logging; its overhead is
1 - trainer / bare at one process. The trainer's rate is the median of its logged
train/samples_per_s windows after the first (evaluation and checkpoints are not in them).

    flock /tmp/vae-bench.lock .venv/bin/python bench/train_speed.py [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m train` does, before torch loads

import torch  # noqa: E402

from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import load_mnist5k  # noqa: E402
from train.config import build_config  # noqa: E402
from train.evaluate import binarize  # noqa: E402
from train.loss import training_objective, vae_loss  # noqa: E402
from train.model import build_model  # noqa: E402
from train.precision import autocast  # noqa: E402


def bare_loop(seconds: float, precision: str, batch_size: int = 128) -> float:
    """Samples/s of forward+backward+AdamW on in-memory batches (the default model)."""
    config = build_config({})
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    images = torch.from_numpy(load_mnist5k().images[:4096]).permute(0, 3, 1, 2).contiguous()
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    count, started, index = 0, None, 0
    for step in range(1 << 30):
        if step == 5:
            count, started = 0, time.perf_counter()
        if started is not None and time.perf_counter() - started > seconds:
            break
        batch = images[index:index + batch_size]
        index = (index + batch_size) % (len(images) - batch_size)
        x = binarize(batch.float().div_(255.0), generator)
        with autocast(precision, device):
            params, posterior = model(x, generator)
        loss = training_objective(vae_loss(params, x, posterior), posterior, beta=1.0, free_bits=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count += batch.shape[0]
    return count / (time.perf_counter() - started)


def torchrun(shards: Path, work: Path, nproc: int, precision: str, seconds: float) -> dict:
    out = work / f"run-{nproc}p-{precision}"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train", f"--data.shards={shards}", f"--run.out_dir={out}", "--run.max_steps=0",
               f"--run.max_time_s={seconds}", "--run.log_interval_steps=10", "--run.eval_interval_steps=100000",
               "--run.checkpoint_interval_steps=100000", "--run.final_iwae_samples=0",
               f"--run.precision={precision}", f"--run.tracking_uri=sqlite:///{work}/mlflow.db",
               "--run.experiment=bench-train-speed"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds * 4 + 300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/samples_per_s" in r]
    windows = windows[1:] if len(windows) > 1 else windows  # the first window holds start-up
    rates = [r["train/samples_per_s"] for r in windows]
    waits = [r["train/data_wait_share"] for r in windows]
    return {"samples_per_s": round(statistics.median(rates), 1), "data_wait_share": round(statistics.median(waits), 3),
            "windows": len(rates), "launch_to_exit_s": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0, help="training seconds per measurement")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default="bench/results/train_speed.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vae-speed-"))
    shards = work / "shards"
    write_shards(load_mnist5k(), shards, samples_per_shard=250, val_fraction=0.1, seed=0, force=True,
                 progress=False)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for precision in args.precisions.split(","):
        bare = bare_loop(args.seconds / 2, precision)
        rows.append({"what": "bare loop, 1 process", "precision": precision, "samples_per_s": round(bare, 1)})
        print(rows[-1], flush=True)
        for nproc in (1, 2):
            measured = torchrun(shards, work, nproc, precision, args.seconds)
            rows.append({"what": f"torchrun -m train, {nproc} process{'es' if nproc > 1 else ''}",
                         "precision": precision, **measured})
            if nproc == 1:
                rows[-1]["overhead_vs_bare"] = round(1 - measured["samples_per_s"] / bare, 3)
            print(rows[-1], flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "cuda": torch.cuda.is_available(), "torch": torch.__version__,
              "command": " ".join(["bench/train_speed.py", *sys.argv[1:]]), "seconds": args.seconds,
              "load_before": load_before, "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'what':<34}{'precision':>10}{'samples/s':>12}{'overhead':>10}{'data wait':>11}")
    for row in rows:
        overhead = f"{row['overhead_vs_bare']:.1%}" if "overhead_vs_bare" in row else ""
        wait = f"{row['data_wait_share']:.1%}" if "data_wait_share" in row else ""
        print(f"{row['what']:<34}{row['precision']:>10}{row['samples_per_s']:>12.1f}{overhead:>10}{wait:>11}")
    print(f"load {load_before} -> {result['load_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
