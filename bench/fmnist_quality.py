"""Fashion-MNIST, whole: test bits/dim of our VAE and of pythae's VAE trained side by side for the same
wall-clock budget, a curve of bits/dim against training time, and the lossless codecs on the same images.

Data: `python -m pipeline shards --source fashion-mnist` (Debian's dataset-fashion-mnist: its 60,000
training images train, its 10,000 test images are the val split). 8-bit grey, 784 dims per image.
Training, both at once, each pinned to its own core with one torch thread (--cores, --threads):
- ours: `python -m train` with OURS_FLAGS (discretised logistic likelihood) for --budget-s seconds,
  a checkpoint every --ours-checkpoint-steps steps, no evaluation during training;
- pythae: bench/pythae_peer.py in the venv of scripts/pythae-venv.sh: pythae's VAE (bce loss) with
  exactly our net's encoder and decoder, for the same budget, a checkpoint every --curve-every-s.
  Its decoder gives pixel means only: it is scored as a discretised logistic centred on that mean
  with ONE log-scale, fitted per checkpoint on 2,000 training images (the scale that maximises their
  reconstruction likelihood; generous: the peer's loss never saw that scale).
Scoring (both in parallel, pinned likewise), all with train.evaluate.iwae_log_likelihood:
- the curve: the first checkpoint at or after each multiple of --curve-every-s of training time,
  IWAE K=--curve-k on a fixed random 1,000 of the test images;
- the final model (ours: its EMA weights): IWAE K=--final-k on all 10,000 test images.
bits/dim = nats / (784 ln 2) on the 8-bit pixels. The codecs (PNG, WebP lossless per image, xz of the
whole set) run on the same 10,000 test images. Grids of samples and reconstructions go to
bench/results/fmnist_{ours,pythae}_{samples,recons}.png.

    scripts/pythae-venv.sh .venv .venv-pythae     # once: pythae beside our torch, ~15 s
    flock /tmp/vae-bench.lock .venv/bin/python bench/fmnist_quality.py [--budget-s 1800]
    # about 30 min of training + 20-30 min of scoring (both at once) + 5 min of codecs on 2 quiet cores

Smoke (minutes): --budget-s 20 --curve-every-s 5 --curve-images 100 --curve-k 5 --final-k 5 --test-images 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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

OURS_MODEL = {"preset": "conv", "likelihood": "discretized_logistic", "latent_dim": 32,
              "widths": [64, 128], "hidden_dim": 512}
"""Our model for this benchmark (see the report of issue 14 for the pilot runs behind the choice)."""
OURS_FLAGS = ["--optim.lr=2e-3", "--data.batch_size=128"]
"""Optimiser flags beyond the defaults (EMA 0.999, cosine over the time budget, warm-up 100 steps)."""
DIMS = 784


def training_jobs(args, shards: Path, work: Path) -> dict[str, list[str]]:
    jobs = {}
    if "ours" in args.systems:
        jobs["train-ours"] = [
            sys.executable, "-m", "train", f"--data.shards={shards}", "--data.num_workers=0",
            *model_flags(args.ours_model), *args.ours_flags,
            f"--run.out_dir={work / 'ours'}", "--run.max_steps=0", f"--run.max_time_s={args.budget_s}",
            f"--run.checkpoint_interval_steps={args.ours_checkpoint_steps}", "--run.keep_checkpoints=100000",
            "--run.eval_interval_steps=1000000000", "--run.final_iwae_samples=0",
            f"--run.tracking_uri=sqlite:///{work}/mlflow.db", "--run.experiment=bench-fmnist",
            "--run.run_name=fmnist-ours", "--run.system_metrics=false"]
    if "pythae" in args.systems:
        peer_model = {key: value for key, value in args.ours_model.items() if key != "likelihood"}
        jobs["train-pythae"] = [
            args.pythae_python, str(BENCH / "pythae_peer.py"), f"--shards={shards}", f"--out={work / 'pythae'}",
            f"--budget-s={args.budget_s}", f"--checkpoint-every-s={args.curve_every_s}",
            f"--model-json={json.dumps(peer_model)}"]
    return jobs


def scoring_jobs(args, shards: Path, work: Path) -> dict[str, list[str]]:
    common = [f"--shards={shards}", f"--work={work}", f"--curve-every-s={args.curve_every_s}",
              f"--curve-images={args.curve_images}", f"--curve-k={args.curve_k}", f"--final-k={args.final_k}",
              f"--test-images={args.test_images}", f"--results={args.results}"]
    return {f"score-{system}": [sys.executable, str(Path(__file__).resolve()), f"--score={system}", *common]
            for system in args.systems}


def checkpoints(system: str, run_dir: Path) -> list[tuple[float, int, Path]]:
    """(training seconds, step, path) of every checkpoint of a run, oldest first."""
    import torch

    if system == "ours":
        return trainer_checkpoints(run_dir)
    found = []
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        found.append((float(state["elapsed_s"]), int(state["step"]), path))
    return sorted(found)


def curve_points(found: list[tuple[float, int, Path]], every_s: float) -> list[tuple[float, int, Path]]:
    """The first checkpoint at or after each multiple of every_s, and the last one."""
    chosen, mark = [], every_s
    for entry in found:
        if entry[0] >= mark:
            chosen.append(entry)
            while mark <= entry[0]:
                mark += every_s
    if found and (not chosen or chosen[-1] is not found[-1]):
        chosen.append(found[-1])
    return chosen


def scorable(system: str, path: Path, x_train):
    """The model a checkpoint holds, as train.evaluate scores it (the peer through FixedScaleLogistic)."""
    import torch

    from bits_per_dim import FixedScaleLogistic, fit_log_scale, peer_net
    from train import load_model

    if system == "ours":
        return load_model(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = peer_net(state["model_config"]["fields"])
    net.load_state_dict(state["state"])
    net.eval()

    def mean_decoder(z):
        return torch.sigmoid(net.decode(z))

    return FixedScaleLogistic(net, mean_decoder, fit_log_scale(net, mean_decoder, x_train))


def score(args) -> int:
    """One system's curve, final score and grids (run as its own pinned process by the driver)."""
    from bits_per_dim import bits_per_dim, final_score, fixed_subset, iwae_nats, read_split

    system, work = args.score, Path(args.work)
    x_test = read_split(args.shards, "val")[:args.test_images].float().div_(255.0)
    x_train = read_split(args.shards, "train")[:2000].float().div_(255.0)  # the peer's scale fit
    curve_x = x_test[fixed_subset(len(x_test), args.curve_images)]
    found = checkpoints(system, work / system)
    if not found:
        raise RuntimeError(f"{system}: no checkpoints under {work / system}")
    curve = []
    for elapsed, step, path in curve_points(found, args.curve_every_s):
        model = scorable(system, path, x_train)
        nats = iwae_nats(model, curve_x, k=args.curve_k)
        curve.append({"train_s": round(elapsed, 1), "step": step, "bits_per_dim": round(bits_per_dim(nats, DIMS), 4),
                      **({"log_scale": model.log_scale} if system == "pythae" else {})})
        print(f"{system} curve: {curve[-1]}", flush=True)
    final = scorable(system, found[-1][2], x_train)
    result = {"system": system, "final_step": found[-1][1], "final_train_s": round(found[-1][0], 1), "curve": curve,
              **final_score(final, x_test, Path(args.results) / f"fmnist_{system}", k=args.final_k),
              **({"log_scale": final.log_scale} if system == "pythae" else {})}
    (work / f"score-{system}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=1800.0, help="training seconds for each system")
    parser.add_argument("--systems", default="ours,pythae", help="comma-separated: ours, pythae")
    parser.add_argument("--cores", default="0,1", help="a core per system, in --systems order ('' = no pinning)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--pythae-python", default=str(REPO / ".venv-pythae/bin/python"),
                        help="python of the venv scripts/pythae-venv.sh made")
    parser.add_argument("--ours-model", type=json.loads, default=OURS_MODEL,
                        help="our model fields as JSON (the peer gets the same net); default: OURS_MODEL")
    parser.add_argument("--ours-flags", type=shlex.split, default=OURS_FLAGS,
                        help="further `python -m train` flags for ours, one string; default: OURS_FLAGS")
    parser.add_argument("--ours-checkpoint-steps", type=int, default=500)
    parser.add_argument("--curve-every-s", type=float, default=300.0)
    parser.add_argument("--curve-images", type=int, default=1000)
    parser.add_argument("--curve-k", type=int, default=100)
    parser.add_argument("--final-k", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=10000, help="test images for the final score (all: 10000)")
    parser.add_argument("--results", default=str(BENCH / "results"), help="where grids go")
    parser.add_argument("--out", default=str(BENCH / "results/fmnist_quality.json"))
    parser.add_argument("--work", default="", help="scratch directory (default: a temporary one, removed at the end)")
    parser.add_argument("--shards", default="", help="existing fashion-mnist shards (default: written into --work)")
    parser.add_argument("--score", default="", help=argparse.SUPPRESS)  # internal: one system's scoring process
    args = parser.parse_args()
    if args.score:
        return score(args)
    args.systems = [s for s in args.systems.split(",") if s]
    if not set(args.systems) <= {"ours", "pythae"}:
        parser.error(f"--systems: expected ours and/or pythae, got {args.systems}")
    if "pythae" in args.systems and not Path(args.pythae_python).exists():
        parser.error(f"--pythae-python {args.pythae_python} does not exist: run scripts/pythae-venv.sh first")
    cores = dict(zip(args.systems, args.cores.split(","))) if args.cores else {}
    work = Path(args.work or tempfile.mkdtemp(prefix="vae-fmnist-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards) if args.shards else work / "shards"
    if not args.shards:
        subprocess.run([sys.executable, "-m", "pipeline", "shards", "--source", "fashion-mnist", "--out", str(shards),
                        "--quiet", "--force"], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    load_before = load_average()
    train_walls = run_all(training_jobs(args, shards, work), {f"train-{s}": c for s, c in cores.items()},
                          args.threads, work)
    load_after_training = load_average()
    score_walls = run_all(scoring_jobs(args, shards, work), {f"score-{s}": c for s, c in cores.items()},
                          args.threads, work)
    scores = {s: json.loads((work / f"score-{s}.json").read_text()) for s in args.systems}
    summaries = {}
    if "ours" in args.systems:
        summaries["ours"] = last_json_line(work / "train-ours.log")
    if "pythae" in args.systems:
        summaries["pythae"] = json.loads((work / "pythae" / "summary.json").read_text())

    from bits_per_dim import nhwc_uint8, read_split
    from lossless_codecs import codec_bits_per_dim

    started = time.monotonic()
    codecs = {k: round(v, 4) for k, v in codec_bits_per_dim(nhwc_uint8(read_split(shards, "val")[:args.test_images])).items()}
    codec_s = round(time.monotonic() - started, 1)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}",
        "command": " ".join(["bench/fmnist_quality.py", *sys.argv[1:]]), "budget_s": args.budget_s,
        "threads": args.threads, "cores": cores, "curve_images": args.curve_images, "curve_k": args.curve_k,
        "final_k": args.final_k, "test_images": args.test_images,
        "ours_model": args.ours_model, "ours_flags": args.ours_flags,
        "load_before": load_before, "load_after_training": load_after_training, "load_after": load_average(),
        "train_wall_s": train_walls, "score_wall_s": score_walls, "codec_s": codec_s,
        "training": summaries, "scores": scores, "codecs_bits_per_dim": codecs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nFashion-MNIST test, {args.test_images} images, bits/dim (IWAE K={args.final_k} for models)")
    print(f"{'what':<48}{'bits/dim':>10}{'steps':>9}{'epochs':>8}")
    for system in args.systems:
        s, t = scores[system], summaries[system]
        label = {"ours": "ours (discretised logistic, EMA)",
                 "pythae": f"pythae VAE, bce; logistic, log-scale {s.get('log_scale', 0):.2f}"}[system]
        print(f"{label:<48}{s['test_bits_per_dim']:>10.3f}{t['steps']:>9}{t['epochs']:>8.1f}")
    for codec, bits in codecs.items():
        print(f"{codec:<48}{bits:>10.3f}")
    print(f"\ncurve (bits/dim, IWAE K={args.curve_k} on a fixed {args.curve_images} test images) by training seconds:")
    for system in args.systems:
        print(f"  {system:<7} " + "  ".join(f"{p['train_s']:.0f}s {p['bits_per_dim']:.3f}" for p in scores[system]["curve"]))
    print(f"load {load_before} -> {result['load_after']}; wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
