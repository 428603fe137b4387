"""The whole Fashion-MNIST through the pipeline: shards, loader ratio, and `torchrun` 2-process training.

One run, three parts on the same shards (60,000 train / 10,000 test as val, written by
`python -m pipeline shards --source fashion-mnist`, default layout):
1. writing the shards (seconds, bytes);
2. the training loader from local disk with 0/1/2 workers over whole epochs, against what one
   training process consumes (the ratio the issue asks for, target >= 5x);
3. `torchrun --nproc_per_node=N -m train` for --epochs epochs of the default model: samples/s (the
   trainer's logged train/samples_per_s, all ranks summed; median of windows after the first),
   seconds per epoch at that rate, wall time of the whole job (start-up, evaluation and saving
   included), and peak RSS of each rank (psutil, sampled every 0.2 s).

    flock /tmp/vae-bench.lock .venv/bin/python bench/fmnist_epoch.py [--epochs 2] [--nproc 2]
    .venv/bin/python bench/fmnist_epoch.py --epochs 0.2                   # smoke check
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

import psutil  # noqa: E402

from bench.report import write_result  # noqa: E402
from bench.loader import shard_set_rate  # noqa: E402
from pipeline.data import open_train_val  # noqa: E402


def write_shards(out: Path) -> float:
    """Seconds `pipeline shards --source fashion-mnist` takes."""
    command = [sys.executable, "-m", "pipeline", "shards", "--source", "fashion-mnist", "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def train_under_torchrun(shards: Path, out_dir: Path, nproc: int, epochs: float, precision: str) -> dict:
    """Run the trainer under torchrun; samples/s from its metrics, peak RSS per rank from psutil."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train", f"--data.shards={shards}", f"--run.out_dir={out_dir}", f"--run.max_epochs={epochs}",
               "--run.max_steps=1000000", f"--run.precision={precision}", "--run.final_iwae_samples=0",
               f"--run.tracking_uri=sqlite:///{out_dir}/mlflow.db"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    started = time.perf_counter()
    launcher = psutil.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_rss: dict[int, int] = {}
    while launcher.poll() is None:
        try:
            for child in launcher.children(recursive=False):
                # torchrun's workers are its direct children; their loader workers are not counted
                peak_rss[child.pid] = max(peak_rss.get(child.pid, 0), child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall_s = time.perf_counter() - started
    output = launcher.stdout.read().decode(errors="replace")
    if launcher.returncode != 0:
        raise RuntimeError(f"training failed ({launcher.returncode}):\n{output[-4000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_s"] for r in records if "train/samples_per_s" in r][1:]
    last = [r for r in records if "train/neg_elbo" in r][-1]
    return {"samples_per_s": statistics.median(rates), "wall_s": wall_s, "steps": last["step"],
            "train_neg_elbo": last["train/neg_elbo"],
            "peak_rss_mib_per_rank": sorted(round(v / 2**20) for v in peak_rss.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fmnist_epoch.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_s = write_shards(shards)
        shard_bytes = sum(p.stat().st_size for p in shards.glob("*.tar"))
        train_set, _ = open_train_val(str(shards), image_shape=(28, 28, 1), announce=False)
        loader_rows = [{"workers": workers,
                        "samples_per_s": shard_set_rate(train_set, args.batch_size, workers, 2 * train_set.num_samples)}
                       for workers in (0, 1, 2)]
        training = train_under_torchrun(shards, Path(tmp) / "run", args.nproc, args.epochs, args.precision)
    per_rank = training["samples_per_s"] / args.nproc
    for row in loader_rows:
        row["ratio_to_one_rank"] = row["samples_per_s"] / per_rank
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "load_average": os.getloadavg(), "command": " ".join(sys.argv), "num_train": train_set.num_samples,
              "write_shards_s": write_s, "shard_mib": shard_bytes / 2**20, "loader": loader_rows,
              "nproc": args.nproc, "precision": args.precision, "epochs": args.epochs, **training,
              "seconds_per_epoch": train_set.num_samples / training["samples_per_s"]}
    print(f"shards: {result['num_train']:,} train images, written in {write_s:.1f} s, {result['shard_mib']:.1f} MiB")
    print(f"{'loader (local disk)':<24} {'samples/s':>10} {'x one rank':>10}")
    for row in loader_rows:
        print(f"{row['workers']:>2} workers{'':<14} {row['samples_per_s']:>10,.0f} {row['ratio_to_one_rank']:>10.1f}")
    print(f"torchrun x{args.nproc} ({args.precision}): {training['samples_per_s']:,.0f} samples/s "
          f"({per_rank:,.0f} per rank), {result['seconds_per_epoch']:.1f} s per epoch, "
          f"{args.epochs:g} epochs in {training['wall_s']:.1f} s wall, peak RSS per rank "
          f"{training['peak_rss_mib_per_rank']} MiB, train neg ELBO {training['train_neg_elbo']:.1f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
