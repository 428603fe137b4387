"""The anomaly application on real digits: a VAE trained on 0-8 only scores held-out 9s higher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.sources import ImageSet
from serve.__main__ import main

pytestmark = pytest.mark.slow
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 400, 100


@pytest.fixture(scope="module")
def normal_model(mnist5k, tmp_path_factory):
    """A small VAE trained in-process on digits 0-8 (400 of each), exported to ONNX."""
    import torch

    from export.__main__ import main as export_main
    from pipeline.shards import write_shards
    from train.config import build_config
    from train.distributed import DistContext
    from train.trainer import run_training

    out = tmp_path_factory.mktemp("normal-0to8")
    picks = np.concatenate([np.flatnonzero(mnist5k.labels == c)[:TRAIN_PER_CLASS] for c in range(9)])
    write_shards(ImageSet("mnist-0to8", mnist5k.images[picks], mnist5k.labels[picks]), out / "shards",
                 samples_per_shard=400, val_fraction=0.1, seed=0, progress=False, force=True)
    config = build_config({
        "data": {"shards": str(out / "shards"), "batch_size": 64, "num_workers": 0},
        "optim": {"warmup_steps": 20},
        "run": {"out_dir": str(out / "run"), "max_steps": 300, "eval_interval_steps": 300, "log_interval_steps": 100,
                "checkpoint_interval_steps": 300, "precision": "fp32", "tracking_uri": f"sqlite:///{out}/mlflow.db"},
    })
    run_training(config, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    assert export_main(["--checkpoint", str(out / "run"), "--out", str(out / "model"),
                        "--shards", str(out / "shards")]) == 0
    return out


def _write_folder(folder, groups: dict[int, np.ndarray]) -> None:
    from PIL import Image

    for label, images in groups.items():
        (folder / str(label)).mkdir(parents=True)
        for index, image in enumerate(images):
            Image.fromarray(image[:, :, 0]).save(folder / str(label) / f"{index:05d}.png")


@pytest.fixture(scope="module")
def held_out(mnist5k, normal_model):
    """Never trained on: 100 of each digit 0-8 plus 100 nines (held-out/), and the same 900 normals plus
    100 inverted digits, white on black turned black on white (ood/, label 10)."""
    normals = {d: mnist5k.images[np.flatnonzero(mnist5k.labels == d)[TRAIN_PER_CLASS:TRAIN_PER_CLASS + HELD_OUT_PER_CLASS]]
               for d in range(9)}
    nines = mnist5k.images[np.flatnonzero(mnist5k.labels == 9)[:HELD_OUT_PER_CLASS]]
    inverted = 255 - np.concatenate([images[:12] for images in normals.values()])[:HELD_OUT_PER_CLASS]
    _write_folder(normal_model / "held-out", {**normals, 9: nines})
    _write_folder(normal_model / "ood", {**normals, 10: inverted})
    return normal_model


def _score(normal_model, folder: str, labels: str, name: str, *extra: str) -> dict:
    out = normal_model / f"{name}.csv"
    assert main(["score", "--model", str(normal_model / "model"), "--input", str(normal_model / folder),
                 "--out", str(out), "--labels", labels, "--samples", "8", *extra]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_held_out_nines_get_a_reported_roc_auc(held_out):
    """The issue's experiment. Its figure is reported, not asserted above 0.5: a likelihood score ranks
    9s among the *easier* digits (less ink than 0, 2, 8), the known weakness of likelihood-based
    anomaly scores; it measured 0.44 here (see the serve section of BENCHMARKS.md)."""
    summary = _score(held_out, "held-out", "9", "nines", "--kind", "likelihood")
    print(f"\nROC AUC, 9s among held-out 0-8 (VAE trained on 0-8, negative ELBO, K=8): {summary['roc_auc']:.4f}")
    assert summary["num_images"] == 1000 and summary["anomaly_labels"] == [9]
    assert 0.2 < summary["roc_auc"] < 0.9  # a broken score (constant, NaN, reversed sign on ink) lands outside


def test_complexity_correction_ranks_nines_above_chance(held_out):
    """The input-complexity score (negative ELBO minus PNG code length, Serra et al. 2020) removes the
    "less ink, more likely" bias: measured 0.58 against 0.45 for the plain negative ELBO here."""
    plain = _score(held_out, "held-out", "9", "nines-plain", "--kind", "likelihood")
    corrected = _score(held_out, "held-out", "9", "nines-png", "--complexity", "png")
    print(f"\nROC AUC, 9s among held-out 0-8: negative ELBO {plain['roc_auc']:.4f}, "
          f"minus PNG code length {corrected['roc_auc']:.4f}")
    assert corrected["complexity"] == "png" and corrected["num_images"] == 1000
    assert corrected["roc_auc"] > plain["roc_auc"] + 0.05 and corrected["roc_auc"] > 0.5


def test_the_default_score_ranks_nines_above_the_likelihood(held_out):
    """The default (for this Bernoulli model: z(neg ELBO - pixel entropy) + z(reconstruction error), standardised
    at export) is what the Fashion-MNIST benchmarks chose; on held-out 9s it must beat the likelihood too."""
    plain = _score(held_out, "held-out", "9", "nines-likelihood", "--kind", "likelihood")
    default = _score(held_out, "held-out", "9", "nines-default")
    print(f"\nROC AUC, 9s among held-out 0-8: negative ELBO {plain['roc_auc']:.4f}, "
          f"default ({default['kind']}) {default['roc_auc']:.4f}")
    assert default["kind"] == "excess_mse"
    assert default["roc_auc"] > plain["roc_auc"] + 0.05 and default["roc_auc"] > 0.5


def test_out_of_distribution_digits_score_far_higher(held_out):
    """Inverted digits (same shapes, different pixel statistics) are clear anomalies: AUC near 1."""
    summary = _score(held_out, "ood", "10", "inverted")
    print(f"\nROC AUC, inverted digits among held-out 0-8: {summary['roc_auc']:.4f}")
    assert summary["roc_auc"] > 0.95, summary


def test_calibrated_threshold_holds_its_false_positive_rate_on_new_normals(held_out):
    """Threshold from the training digits' validation split at 5% FPR, applied to unseen 0-8 and 9s."""
    assert main(["score", "--model", str(held_out / "model"), "--input", str(held_out / "shards"),
                 "--split", "val", "--out", str(held_out / "calibration.csv"), "--calibrate",
                 "--target-fpr", "0.05", "--samples", "8"]) == 0
    assert main(["score", "--model", str(held_out / "model"), "--input", str(held_out / "ood"), "--samples", "8",
                 "--out", str(held_out / "flagged.csv"), "--threshold-file", str(held_out / "threshold.json")]) == 0
    rows = np.genfromtxt(held_out / "flagged.csv", delimiter=",", names=True, dtype=None, encoding="ascii")
    inverted, normals = rows["is_anomaly"][rows["label"] == 10], rows["is_anomaly"][rows["label"] != 10]
    print(f"\nflagged at the 5% FPR threshold: {normals.mean():.1%} of unseen 0-8, {inverted.mean():.1%} of inverted")
    assert normals.mean() < 0.15 and inverted.mean() > 0.9
    # the threshold belongs to the score it was calibrated on: another score is refused, not compared
    assert main(["score", "--model", str(held_out / "model"), "--input", str(held_out / "ood"), "--samples", "8",
                 "--complexity", "png", "--out", str(held_out / "other.csv"),
                 "--threshold-file", str(held_out / "threshold.json")]) != 0
