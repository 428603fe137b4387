"""Colour: the old net (preset conv) against a ResNet preset on 64x64 RGB patches of scikit-image's
photographs, side by side for the same wall-clock budget, bits/dim on held-out photographs vs PNG.

Data: `python -m pipeline shards --source skimage-patches` (64x64 patches, stride 32, flat ones left
out; train/val split by photograph, so no val patch shares a photograph with a training patch).
Both nets train at once with `python -m train` (discretised logistic likelihood, defaults otherwise:
lr 2e-3, batch 128, EMA, cosine over the budget), each pinned to its own core with --threads torch
threads. Both are then scored at once with train.evaluate.iwae_log_likelihood (IWAE K=--iwae-k) on
every held-out patch (EMA weights); bits/dim = nats / (64*64*3 ln 2). The codecs (PNG, WebP lossless
per patch, xz of the whole set) run on the same patches. Grids of samples and reconstructions go to
bench/results/colour_{conv,NEW}_{samples,recons}.png.

    flock /tmp/vae-bench.lock .venv/bin/python bench/colour_quality.py [--budget-s 900] [--new-preset resnet-s]
    # about 15 min of training + 10-15 min of scoring (both at once) + 1 min of codecs on 2 quiet cores

Smoke (minutes): --budget-s 15 --iwae-k 2 --test-images 16 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m train` does, before torch loads

from pinned_jobs import last_json_line, load_average, model_flags, run_all, trainer_checkpoints  # noqa: E402

SIZE, CHANNELS = 64, 3


def net_fields(preset: str) -> dict:
    return {"preset": preset, "image_size": SIZE, "channels": CHANNELS, "likelihood": "discretized_logistic"}


def training_job(args, name: str, preset: str, shards: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "train", f"--data.shards={shards}", "--data.num_workers=0",
            f"--data.batch_size={args.batch_size}", *model_flags(net_fields(preset)),
            f"--run.out_dir={work / name}", "--run.max_steps=0", f"--run.max_time_s={args.budget_s}",
            "--run.checkpoint_interval_steps=1000000000", "--run.eval_interval_steps=1000000000",
            "--run.final_iwae_samples=0", f"--run.tracking_uri=sqlite:///{work}/mlflow-{name}.db",  # one each: a shared fresh sqlite file races in its migration
           
            "--run.experiment=bench-colour", f"--run.run_name=colour-{name}", "--run.system_metrics=false"]


def score(args) -> int:
    """One net's final IWAE bits/dim on the held-out patches and its grids (run pinned by the driver)."""
    from bits_per_dim import final_score, read_split
    from train import load_model

    name, work = args.score, Path(args.work)
    x_test = read_split(args.shards, "val")[:args.test_images].float().div_(255.0)
    elapsed, step, path = trainer_checkpoints(work / name)[-1]
    model = load_model(path)
    result = {"net": name, "step": step, "train_s": round(elapsed, 1),
              **final_score(model, x_test, Path(args.results) / f"colour_{name}", k=args.iwae_k, batch=10, chunk=25)}
    (work / f"score-{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=900.0, help="training seconds for each net")
    parser.add_argument("--new-preset", default="resnet-s", help="the ResNet preset set against conv")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cores", default="0,1", help="a core for conv, one for the new preset ('' = no pinning)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--iwae-k", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=100000, help="held-out patches scored (default: all)")
    parser.add_argument("--results", default=str(BENCH / "results"), help="where grids go")
    parser.add_argument("--out", default=str(BENCH / "results/colour_quality.json"))
    parser.add_argument("--work", default="", help="scratch directory (default: a temporary one, removed at the end)")
    parser.add_argument("--score", default="", help=argparse.SUPPRESS)  # internal: one net's scoring process
    parser.add_argument("--shards", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        return score(args)
    nets = {"conv": "conv", args.new_preset: args.new_preset}
    cores = dict(zip(nets, args.cores.split(","))) if args.cores else {}
    work = Path(args.work or tempfile.mkdtemp(prefix="vae-colour-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    subprocess.run([sys.executable, "-m", "pipeline", "shards", "--source", "skimage-patches", "--out", str(shards),
                    "--quiet", "--force"], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    load_before = load_average()
    train_walls = run_all({f"train-{n}": training_job(args, n, p, shards, work) for n, p in nets.items()},
                          {f"train-{n}": c for n, c in cores.items()}, args.threads, work)
    common = [f"--shards={shards}", f"--work={work}", f"--iwae-k={args.iwae_k}", f"--test-images={args.test_images}",
              f"--results={args.results}"]
    score_walls = run_all({f"score-{n}": [sys.executable, str(Path(__file__).resolve()), f"--score={n}", *common]
                           for n in nets}, {f"score-{n}": c for n, c in cores.items()}, args.threads, work)
    scores = {n: json.loads((work / f"score-{n}.json").read_text()) for n in nets}
    training = {n: last_json_line(work / f"train-{n}.log") for n in nets}

    from bits_per_dim import nhwc_uint8, read_split
    from lossless_codecs import codec_bits_per_dim

    test = read_split(shards, "val")[:args.test_images]
    train_count = len(read_split(shards, "train"))
    codecs = {k: round(v, 4) for k, v in codec_bits_per_dim(nhwc_uint8(test)).items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}",
        "command": " ".join(["bench/colour_quality.py", *sys.argv[1:]]), "budget_s": args.budget_s,
        "threads": args.threads, "cores": cores, "batch_size": args.batch_size, "iwae_k": args.iwae_k,
        "train_patches": train_count, "test_patches": len(test),
        "load_before": load_before, "load_after": load_average(), "train_wall_s": train_walls,
        "score_wall_s": score_walls, "training": training, "scores": scores, "codecs_bits_per_dim": codecs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{len(test)} held-out 64x64 RGB patches ({train_count} for training), bits/dim "
          f"(IWAE K={args.iwae_k} for the nets), {args.budget_s:.0f} s of training each")
    print(f"{'what':<40}{'bits/dim':>10}{'params':>12}{'steps':>8}{'epochs':>8}")
    for n in nets:
        s, t = scores[n], training[n]
        print(f"{'preset ' + n:<40}{s['test_bits_per_dim']:>10.3f}{s['params']:>12,}{t['steps']:>8}{t['epochs']:>8.1f}")
    for codec, bits in codecs.items():
        print(f"{codec:<40}{bits:>10.3f}")
    print(f"load {load_before} -> {result['load_after']}; wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
