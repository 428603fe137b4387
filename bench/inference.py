"""Encoder and decoder throughput and latency: PyTorch eager vs onnxruntime, against the FLOP floor.

    flock /tmp/vae-bench.lock .venv/bin/python bench/inference.py [--checkpoint out/run] [--batch 1,64,1024]

Backends, measured side by side in one process (rounds interleaved, median per call):
  torch-eager       the checkpoint's model, fp32, torch.inference_mode
  ort-cpu           encoder.onnx / decoder.onnx, CPUExecutionProvider, default optimisation at load
  ort-cpu-offline   an onnxruntime-optimised copy (level `all`), loaded with optimisation off
  ort-cpu-fp16      the fp16 variant (float32 io) on the CPU, for information
  and, when a GPU is present: torch-cuda, ort-cuda, ort-tensorrt (fp16, engine cache).

FLOP floor: the model's FLOPs per image (torch.utils.flop_counter: convolutions and matmuls, two
FLOPs per multiply-add) divided by this device's measured peak (best of a large fp32 matmul on all
threads). Without --checkpoint the default architecture is benchmarked with untrained weights
(speed does not depend on the weights). Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_gflops(device: str, size: int = 2048, seconds: float = 2.0) -> float:
    """Best fp32 matmul rate (GFLOP/s) on `device` over about `seconds`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        torch.mm(a, b)
    best, started, runs = 0.0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds or runs < 5:
        runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - begin) / 1e9)
    return best


def flops_per_image(model) -> dict[str, float]:
    """FLOPs of one image through encoder and decoder (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = model.config
    counts = {}
    with torch.inference_mode():
        x = torch.rand(8, config.channels, config.image_size, config.image_size)
        z = torch.randn(8, config.latent_dim)
        for name, call, arg in (("encoder", lambda t: model.encode(t).mean, x),
                                ("decoder", lambda t: model.image_mean(model.decode(t)), z)):
            counter = FlopCounterMode(display=False)
            with counter:
                call(arg)
            counts[name] = counter.get_total_flops() / 8
    return counts


def gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() and torch.cuda.is_available()


def build_runners(model, model_dir: Path, work: Path, threads: int, spin: bool = True) -> dict[str, dict]:
    """backend -> {"encoder": fn(x), "decoder": fn(z), "setup_s": {...}}; each fn returns numpy."""
    import onnxruntime as ort

    from export.model_card import read_model_json
    from export.optimize import optimized_copy

    metadata = read_model_json(model_dir)
    runners: dict[str, dict] = {}

    def eager(device: str):
        module = model.to(device)

        def encode(x):
            with torch.inference_mode():
                out = module.encode(torch.from_numpy(x).to(device)).mean
                return out.cpu().numpy()

        def decode(z):
            with torch.inference_mode():
                out = module.image_mean(module.decode(torch.from_numpy(z).to(device)))
                return out.cpu().numpy()
        return {"encoder": encode, "decoder": decode, "setup_s": {}}

    def sessions(files: dict[str, Path], providers: list, optimized: bool = False, provider_options=None):
        runner, setup = {}, {}
        for part, path in files.items():
            started = time.perf_counter()
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            if optimized:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done offline
                session = ort.InferenceSession(str(path), options, providers=providers)
            else:
                session = ort.InferenceSession(str(path), options, providers=providers,
                                               provider_options=provider_options)
            setup[part] = time.perf_counter() - started
            input_name = session.get_inputs()[0].name
            output = 0 if part == "encoder" else 1
            runner[part] = (lambda s, n, o: lambda a: s.run(None, {n: a})[o])(session, input_name, output)
            runner["provider"] = session.get_providers()[0]
        runner["setup_s"] = setup
        return runner

    default = {part: model_dir / metadata[part]["file"] for part in ("encoder", "decoder")}
    runners["torch-eager"] = eager("cpu")
    runners["ort-cpu"] = sessions(default, ["CPUExecutionProvider"])
    offline = {part: optimized_copy(path, work / f"{part}.cpu-all.onnx", provider="cpu", level="all")
               for part, path in default.items()}
    runners["ort-cpu-offline"] = sessions(offline, ["CPUExecutionProvider"], optimized=True)
    if "fp16" in metadata.get("variants", {}):
        fp16 = {part: model_dir / metadata["variants"]["fp16"][part]["file"] for part in ("encoder", "decoder")}
        runners["ort-cpu-fp16"] = sessions(fp16, ["CPUExecutionProvider"])
    if gpu_present():
        runners["torch-cuda"] = eager("cuda")
        runners["ort-cuda"] = sessions(default, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        trt_options = [{"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(work / "trt-cache")}, {}, {}]
        runners["ort-tensorrt"] = sessions(default, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                     "CPUExecutionProvider"], provider_options=trt_options)
    return runners


def time_cell(functions: dict[str, callable], arg: np.ndarray, rounds: int, round_s: float) -> dict[str, list[float]]:
    """Seconds per call for each function, rounds interleaved so drift hits all alike."""
    for fn in functions.values():  # warm-up (first-call allocations, TensorRT engine build)
        fn(arg)
        fn(arg)
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            calls, started = 0, time.perf_counter()
            while True:
                fn(arg)
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= round_s and calls >= 2:
                    break
            samples[name].append(elapsed / calls)
    return samples


def profile_ops(path: Path, arg: np.ndarray, threads: int, runs: int = 5) -> list[dict]:
    """Where onnxruntime (CPU) spends a call: per node, milliseconds per call, largest first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: arg})
    session.end_profiling()  # drop the first (allocating) call
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, {name: arg})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[tuple[str, str], float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = (event["args"]["op_name"], event["name"].removesuffix("_kernel_time"))
            totals[key] = totals.get(key, 0.0) + event["dur"] / 1e3 / (runs + 1)
    return [{"op": op, "node": node, "ms": ms} for (op, node), ms in sorted(totals.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="trained run/checkpoint (default: untrained default model)")
    parser.add_argument("--batch", default="1,64,1024", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per cell")
    parser.add_argument("--round-s", type=float, default=0.3, help="seconds per backend per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and onnxruntime")
    parser.add_argument("--no-spin", action="store_true",
                        help="onnxruntime intra-op threads sleep instead of spinning (helps on a shared CPU; "
                             "pair with OMP_WAIT_POLICY=PASSIVE for torch)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "inference.json"))
    parser.add_argument("--keep-model", default=None, metavar="DIR",
                        help="also keep the export it measured (model.json, ONNX files) in DIR, for the other bench "
                             "scripts (scripts/gpu-check.sh)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    torch.set_num_threads(args.threads)

    from export.onnx_export import export_verified
    from train.config import TrainConfig, build_config

    if args.checkpoint:
        from train import load_checkpoint, load_model
        from train.config import config_from_dict

        model, state = load_model(args.checkpoint), load_checkpoint(args.checkpoint)
        config = config_from_dict(state["config"])
    else:
        torch.manual_seed(0)
        from train.model import build_model

        config, state = build_config({}), {"step": 0}
        model = build_model(config.model).eval()
    assert isinstance(config, TrainConfig)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as scratch:
        work = Path(scratch)
        shape = (config.model.channels, config.model.image_size, config.model.image_size)
        images = np.random.default_rng(0).random((256, *shape), dtype=np.float32)  # speed only
        export_verified(model, config, state, work / "model", images, precisions=("fp32", "fp16"),
                        batch_sizes=(1, 7, 64))
        if args.keep_model:
            shutil.copytree(work / "model", args.keep_model, dirs_exist_ok=True)
        runners = build_runners(model, work / "model", work, args.threads, spin=not args.no_spin)
        flops = flops_per_image(model)
        peak = {"cpu": peak_gflops("cpu")}
        if gpu_present():
            peak["cuda"] = peak_gflops("cuda", size=8192)
        rng = np.random.default_rng(1)
        rows = []
        for part in ("encoder", "decoder"):
            for batch in batches:
                arg = (rng.random((batch, *shape), dtype=np.float32) if part == "encoder"
                       else rng.standard_normal((batch, config.model.latent_dim)).astype(np.float32))
                functions = {name: runner[part] for name, runner in runners.items()}
                samples = time_cell(functions, arg, args.rounds, args.round_s)
                for name, times in samples.items():
                    seconds = statistics.median(times)
                    device = "cuda" if name in ("torch-cuda", "ort-cuda", "ort-tensorrt") else "cpu"
                    floor_s = flops[part] * batch / (peak[device] * 1e9)
                    rows.append({"graph": part, "batch": batch, "backend": name,
                                 "provider": runners[name].get("provider", "torch"),
                                 "latency_ms": seconds * 1e3, "images_per_s": batch / seconds,
                                 "gflops": flops[part] * batch / seconds / 1e9,
                                 "floor_ms": floor_s * 1e3, "x_floor": seconds / floor_s,
                                 "spread_ms": [min(times) * 1e3, max(times) * 1e3]})
        setup = {name: runner["setup_s"] for name, runner in runners.items()}
        biggest = max(batches)
        profiles = {
            "encoder": profile_ops(work / "model" / "encoder.onnx",
                                   rng.random((biggest, *shape), dtype=np.float32), args.threads),
            "decoder": profile_ops(work / "model" / "decoder.onnx",
                                   rng.standard_normal((biggest, config.model.latent_dim)).astype(np.float32),
                                   args.threads)}
    for row in rows:
        eager = next(r for r in rows if r["graph"] == row["graph"] and r["batch"] == row["batch"]
                     and r["backend"] == "torch-eager")
        row["speedup_vs_eager"] = eager["latency_ms"] / row["latency_ms"]

    print(f"{'graph':<8} {'batch':>5} {'backend':<16} {'latency ms':>11} {'images/s':>10} {'GFLOP/s':>8} "
          f"{'x floor':>8} {'vs eager':>8}")
    for r in rows:
        print(f"{r['graph']:<8} {r['batch']:>5} {r['backend']:<16} {r['latency_ms']:>11.3f} "
              f"{r['images_per_s']:>10.0f} {r['gflops']:>8.1f} {r['x_floor']:>8.2f} {r['speedup_vs_eager']:>7.2f}x")
    print(f"FLOPs per image: encoder {flops['encoder'] / 1e6:.2f} M, decoder {flops['decoder'] / 1e6:.2f} M; "
          f"peak {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in peak.items())}")
    for part, ops in profiles.items():
        print(f"onnxruntime CPU {part} at batch {biggest}, per node: " + ", ".join(
            f"{o['op']} {o['node']} {o['ms']:.1f} ms" for o in ops[:5]))
    print("session setup s: " + "; ".join(f"{k}: " + ", ".join(f"{p} {v * 1e3:.0f} ms" for p, v in s.items())
                                          for k, s in setup.items() if s))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
        "cores": os.cpu_count(), "threads": args.threads, "ort_spinning": not args.no_spin,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "gpu": torch.cuda.get_device_name(0) if gpu_present() else None,
        "load_before": load_before, "load_after": load_average(),
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "checkpoint": args.checkpoint, "flops_per_image": flops, "peak_gflops": peak,
        "session_setup_s": setup, "rows": rows, "ort_cpu_profile_at_max_batch": profiles,
        "command": "bench/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load {load_before} -> {result['load_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
