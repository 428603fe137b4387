"""`python -m serve` commands on the real exported model and real digit shards."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from serve import ops
from serve.__main__ import main
from serve.ops import Direct
from tests.conftest import REPO, VENV_BIN, subprocess_env


def test_generate_npy_is_the_seeded_stream_whatever_the_batch(exported_model, tmp_path):
    from pipeline.images import nchw_to_nhwc, to_uint8
    from serve.runtime import VAERuntime

    assert main(["generate", "--model", str(exported_model), "-n", "300", "--out", str(tmp_path / "a"),
                 "--format", "npy", "--batch", "64", "--seed", "4", "--grid", str(tmp_path / "grid.png"),
                 "--no-progress"]) == 0
    assert main(["generate", "--model", str(exported_model), "-n", "300", "--out", str(tmp_path / "b"),
                 "--batch", "1000", "--seed", "4", "--workers", "1", "--no-progress"]) == 0
    a, b = np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "b" / "samples.npy")
    assert a.shape == (300, 28, 28, 1) and a.dtype == np.uint8
    expected = to_uint8(nchw_to_nhwc(Direct(VAERuntime(exported_model)).run(ops.sample, 300, seed=4)))
    assert np.abs(a.astype(int) - expected).max() <= 1 and np.abs(a.astype(int) - b).max() <= 1
    assert Image.open(tmp_path / "grid.png").size == (2 * (8 * 30 + 2),) * 2  # 64 samples, 8x8, scale 2


def test_generate_png_and_wds_feed_the_pipeline(exported_model, tmp_path):
    from pipeline.loader import open_split
    from pipeline.shards import read_shard_images

    assert main(["generate", "--model", str(exported_model), "-n", "250", "--out", str(tmp_path / "png"),
                 "--format", "png", "--batch", "100", "--no-progress"]) == 0
    files = sorted((tmp_path / "png").rglob("*.png"))
    assert len(files) == 250 and np.asarray(Image.open(files[-1])).shape == (28, 28)
    assert main(["generate", "--model", str(exported_model), "-n", "250", "--out", str(tmp_path / "wds"),
                 "--format", "wds", "--batch", "64", "--samples-per-shard", "100", "--seed", "1",
                 "--no-progress"]) == 0
    shards = open_split(str(tmp_path / "wds"), "train")
    assert shards.counts == [100, 100, 50] and shards.manifest.image_shape == (28, 28, 1)
    assert shards.manifest.layout == "block"  # "auto" for 28x28, as `pipeline shards` picks
    blocks = [read_shard_images(url, shards.manifest.image_shape) for url in shards.urls]
    images, labels = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
    assert images.shape == (250, 28, 28, 1) and set(labels.tolist()) == {-1}  # generated: unlabelled
    npy_dir = tmp_path / "npy"
    assert main(["generate", "--model", str(exported_model), "-n", "250", "--out", str(npy_dir), "--seed", "1",
                 "--no-progress"]) == 0
    np.testing.assert_array_equal(images, np.load(npy_dir / "samples.npy"))
    # the plain one-PNG-per-sample layout, for readers outside this project
    assert main(["generate", "--model", str(exported_model), "-n", "30", "--out", str(tmp_path / "wds-png"),
                 "--format", "wds", "--layout", "png", "--seed", "1", "--no-progress"]) == 0
    png_shards = open_split(str(tmp_path / "wds-png"), "train")
    assert png_shards.manifest.layout == "png"
    with tarfile.open(png_shards.urls[0]) as tar:
        names = tar.getnames()
    assert len(names) == 30 and all(name.endswith(".png") for name in names)
    png_images, _ = read_shard_images(png_shards.urls[0], (28, 28, 1))
    np.testing.assert_array_equal(png_images, images[:30])  # PNG in the tar is lossless


def test_encode_writes_latents_labels_and_a_plot(exported_model, small_shards, tmp_path):
    import pyarrow.parquet as pq

    from serve.runtime import VAERuntime

    assert main(["encode", "--model", str(exported_model), "--input", str(small_shards), "--split", "val",
                 "--out", str(tmp_path / "z.npy"), "--plot", str(tmp_path / "plot.png")]) == 0
    z, labels = np.load(tmp_path / "z.npy"), np.load(tmp_path / "z.labels.npy")
    assert z.shape == (120, 16) and sorted(np.bincount(labels)) == [12] * 10
    assert Image.open(tmp_path / "plot.png").size[0] > 300
    assert main(["encode", "--model", str(exported_model), "--input", str(small_shards), "--split", "val",
                 "--out", str(tmp_path / "z.parquet"), "--plot", str(tmp_path / "tsne.png"), "--plot-method", "tsne"]) == 0
    assert Image.open(tmp_path / "tsne.png").size[0] > 300
    table = pq.read_table(tmp_path / "z.parquet").to_pandas()
    assert list(table.columns[:3]) == ["key", "label", "mean_0"] and len(table) == 120
    np.testing.assert_allclose(table[[f"mean_{d}" for d in range(16)]].to_numpy(), z, rtol=1e-6)
    # an image folder with numeric subfolders gives labels too
    for index in range(4):
        folder = tmp_path / "folder" / str(index % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(index).random((28, 28)) * 255).astype(np.uint8)).save(folder / f"{index}.png")
    assert main(["encode", "--model", str(exported_model), "--input", str(tmp_path / "folder"),
                 "--out", str(tmp_path / "f.npy")]) == 0
    assert np.load(tmp_path / "f.labels.npy").tolist() == [0, 0, 1, 1]
    x = np.stack([np.asarray(Image.open(p), np.float32)[None] / 255 for p in sorted((tmp_path / "folder").rglob("*.png"))])
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), Direct(VAERuntime(exported_model)).run(ops.encode, x).mean,
                               rtol=1e-5)


def test_score_reports_auc_and_calibrates_a_threshold(exported_model, small_shards, tmp_path, capsys):
    assert main(["score", "--model", str(exported_model), "--input", str(small_shards), "--split", "val",
                 "--out", str(tmp_path / "s.csv"), "--labels", "1", "--samples", "4", "--maps", str(tmp_path / "maps"),
                 "--kind", "likelihood"]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 0.0 <= summary["roc_auc"] <= 1.0 and summary["anomaly_labels"] == [1] and summary["kind"] == "likelihood"
    assert "ROC AUC" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 120 and all(float(r["score"]) > 0 for r in rows)
    # one heat map per image, in input order, each named with its key in maps.csv
    maps = list(csv.DictReader(open(tmp_path / "maps" / "maps.csv")))
    assert [m["key"] for m in maps] == [r["key"] for r in rows]
    first = Image.open(tmp_path / "maps" / maps[0]["file"])
    assert first.size == (28, 28) and first.mode == "RGB"
    assert all(0 < float(m["sum_nats"]) < float(r["score"]) for m, r in zip(maps, rows))  # the score adds the KL
    assert main(["score", "--model", str(exported_model), "--input", str(small_shards), "--split", "train",
                 "--out", str(tmp_path / "normal.csv"), "--calibrate", "--target-fpr", "0.05"]) == 0
    threshold = json.loads((tmp_path / "threshold.json").read_text())["threshold"]
    flagged = [int(r["is_anomaly"]) for r in csv.DictReader(open(tmp_path / "normal.csv"))]
    assert 0 < np.mean(flagged) <= 0.05  # calibrated on exactly these scores
    assert main(["score", "--model", str(exported_model), "--input", str(small_shards), "--out",
                 str(tmp_path / "v.csv"), "--threshold-file", str(tmp_path / "threshold.json")]) == 0
    assert all(r["is_anomaly"] in ("0", "1") for r in csv.DictReader(open(tmp_path / "v.csv")))
    assert threshold > 0


def test_score_defaults_to_the_models_combination_and_warns_when_a_model_has_none(exported_model, small_shards,
                                                                                  tmp_path, capsys):
    assert main(["score", "--model", str(exported_model), "--input", str(small_shards), "--split", "val",
                 "--out", str(tmp_path / "d.csv")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["kind"] == "excess_mse"
    scores = [float(r["score"]) for r in csv.DictReader(open(tmp_path / "d.csv"))]
    assert abs(np.mean(scores)) < 0.5 and "warning" not in capsys.readouterr().err  # z-scores on its own val images
    old = tmp_path / "old"
    shutil.copytree(exported_model, old)
    card = json.loads((old / "model.json").read_text())
    del card["anomaly_score"]
    (old / "model.json").write_text(json.dumps(card))
    assert main(["score", "--model", str(old), "--input", str(small_shards), "--out", str(tmp_path / "o.csv")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["kind"] == "likelihood"
    assert "warning: this model was exported without anomaly-score statistics" in capsys.readouterr().err


def test_interpolate_and_traverse_write_strips(exported_model, small_shards, tmp_path):
    assert main(["interpolate", "--model", str(exported_model), "--input", str(small_shards), "--pairs", "0:1,2:3",
                 "--steps", "7", "--mode", "slerp", "--out", str(tmp_path / "i.png")]) == 0
    assert Image.open(tmp_path / "i.png").size == (2 * (7 * 30 + 2), 2 * (2 * 30 + 2))
    assert main(["traverse", "--model", str(exported_model), "--input", str(small_shards), "--dims", "0,1,2",
                 "--steps", "5", "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(tmp_path / "t.png").size == (2 * (5 * 30 + 2), 2 * (3 * 30 + 2))


@pytest.mark.parametrize("args, message", [
    (["interpolate", "--pairs", "0-1"], "expected A:B index pairs"),
    (["traverse", "--dims", "99"], "latent dimensions must lie in"),
    (["score", "--labels", "42"], "need both anomalies and normal images"),
    (["encode", "--out", "latents.txt"], "must end in .npy or .parquet"),
])
def test_bad_arguments_exit_nonzero_with_the_reason(exported_model, small_shards, tmp_path, capsys, args, message):
    command, *rest = args
    extra = [] if "--out" in rest else ["--out", str(tmp_path / "out.png")]
    assert main([command, "--model", str(exported_model), "--input", str(small_shards), *rest, *extra]) == 1
    assert message in capsys.readouterr().err


def test_missing_model_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert "has no model.json" in capsys.readouterr().err


def test_models_uri_downloads_from_the_mlflow_registry(exported_model, tmp_path):
    """models:/NAME/VERSION and models:/NAME@ALIAS, through a real MLflow store and registry."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from export.model_uri import resolve_model_dir, tracking_context

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(exported_model), artifact_path="model")
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("vae-digits")
    version = client.create_model_version("vae-digits", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("vae-digits", "prod", version.version)
    # the caller's own MLflow setup (here: another store) is what it was after resolving
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    with tracking_context(elsewhere):
        by_version = resolve_model_dir("models:/vae-digits/1", tracking_uri=uri, dst=tmp_path / "cache" / "v1")
        by_alias = resolve_model_dir("models:/vae-digits@prod", tracking_uri=uri, dst=tmp_path / "cache" / "prod")
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (elsewhere, elsewhere)
    for path in (by_version, by_alias):
        assert (path / "model.json").read_bytes() == (exported_model / "model.json").read_bytes()
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION"):
        resolve_model_dir("models:/vae-digits/v1", tracking_uri=uri)
    # the command line takes the URI too (MLflow stays out of serve until a models:/ URI is used)
    result = subprocess.run([str(VENV_BIN / "python"), "-m", "serve", "generate", "--model", "models:/vae-digits@prod",
                             "-n", "8", "--out", str(tmp_path / "g.png")], cwd=REPO, capture_output=True, text=True,
                            env=subprocess_env(MLFLOW_TRACKING_URI=uri, VAE_SERVE_CACHE=str(tmp_path / "cache2")),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "g.png").is_file()
