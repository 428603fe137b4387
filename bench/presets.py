"""Training-step speed of each model preset at its intended image sizes: samples/s for forward,
backward and AdamW at batch 32 per process, fp32 and bf16 autocast, 1 and 2 processes, plus
parameters and FLOPs.

A rough figure of what a preset costs, not a trainer benchmark (bench/train_speed.py is that): the
images are random 8-bit values (speed does not depend on them), 3 channels with the discretised
logistic likelihood (the conv preset: 1 channel, Bernoulli, as it is trained on digits). Each row
is the median step time over --steps timed steps after --warmup untimed ones. One process uses
torch's default threads; N processes are a real `torchrun --standalone --nproc_per_node=N` group
(DistributedDataParallel, gloo on CPU, NCCL on GPU) with cores/N threads each, and their samples/s
is N x batch / rank 0's median step time.

    flock /tmp/vae-bench.lock .venv/bin/python bench/presets.py [--steps 20] [--presets resnet-s,resnet-m] [--processes 1,2]
    # about 15 min on 2 cores with --max-size 128 (the resnet-l 128 px rows dominate)
    .venv/bin/python bench/presets.py --device cuda   # the same on a GPU (bf16 autocast where supported)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m train` does, before torch loads

import torch  # noqa: E402

from train.config import build_config  # noqa: E402
from train.loss import training_objective, vae_loss  # noqa: E402
from train.model import build_model  # noqa: E402
from train.precision import autocast, cpu_supports_bf16  # noqa: E402
from train.presets import PRESETS, preset_figures  # noqa: E402


def step_time_s(preset: str, size: int, precision: str, device: torch.device, batch_size: int,
                warmup: int, steps: int, distributed: bool = False) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of `preset` at `size` px;
    distributed: inside a torchrun group, the model wrapped in DDP (its gradients all-reduced)."""
    channels, likelihood = (1, "bernoulli") if preset == "conv" else (3, "discretized_logistic")
    config = build_config({"model": {"preset": preset, "image_size": size, "channels": channels,
                                     "likelihood": likelihood}}).model
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    likelihood_of = model.likelihood  # the unwrapped model's: DDP does not forward attributes
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch_size, channels, size, size), generator=generator, device=device) / 255.0
    if likelihood == "bernoulli":
        x = (x > 0.5).float()
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast(precision, device):
            params, posterior = model(x, generator)
        loss = training_objective(vae_loss(params, x, posterior, likelihood_of), posterior, beta=1.0, free_bits=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def ddp_child(preset: str, size: int, precision: str, device_type: str, batch_size: int, warmup: int,
              steps: int) -> int:
    """One rank of a torchrun group: time the steps under DDP; rank 0 prints its median step seconds as JSON."""
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        seconds = step_time_s(preset, size, precision, device, batch_size, warmup, steps, distributed=True)
        if rank == 0:
            print(json.dumps({"step_s": seconds, "threads": torch.get_num_threads()}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def group_step_time_s(num_processes: int, preset: str, size: int, precision: str, device: torch.device,
                      batch_size: int, warmup: int, steps: int) -> tuple[float, int]:
    """(rank 0's median step seconds, threads per process) of a torchrun group of num_processes ranks."""
    threads = max(1, (os.cpu_count() or 1) // num_processes) if device.type == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
               str(Path(__file__).resolve()), "--ddp-child", preset, str(size), precision, device.type,
               f"--batch-size={batch_size}", f"--warmup={warmup}", f"--steps={steps}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun for {preset} {size} px {precision} x{num_processes} failed "
                           f"({done.returncode}):\n{done.stderr[-3000:]}")
    child = json.loads(lines[-1])
    return child["step_s"], child["threads"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--sizes", default="", help="comma-separated image sizes (default: each preset's own)")
    parser.add_argument("--max-size", type=int, default=0,
                        help="skip rows above this image size (0: none; on a small CPU, 128 skips resnet-l at 256 px, "
                             "whose fp32 step at batch 32 needs tens of GB and minutes)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (>1: a torchrun DDP group)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ddp-child", nargs=4, metavar=("PRESET", "SIZE", "PRECISION", "DEVICE"),
                        help=argparse.SUPPRESS)  # internal: one rank of a torchrun group
    parser.add_argument("--out", default="bench/results/presets.json")
    args = parser.parse_args()
    if args.ddp_child:
        preset, size, precision, device_type = args.ddp_child
        return ddp_child(preset, int(size), precision, device_type, args.batch_size, args.warmup, args.steps)
    processes = [int(n) for n in args.processes.split(",") if n]
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; expected some of {list(PRESETS)}")
    device = torch.device(args.device)
    native_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    print(f"{'preset':<10}{'size':>6}{'params':>10}{'GFLOPs':>9}{'precision':>11}{'procs':>6}{'threads':>8}"
          f"{'step ms':>10}{'samples/s':>11}")
    for name in names:
        sizes = [int(s) for s in args.sizes.split(",") if s] or list(PRESETS[name].measured_at)
        sizes = [s for s in sizes if not args.max_size or s <= args.max_size]
        for size in sizes:
            channels, likelihood = (1, "bernoulli") if name == "conv" else (3, "discretized_logistic")
            parameters, flops = preset_figures(name, size, channels, likelihood)
            for precision in args.precisions.split(","):
                for num in processes:
                    if num == 1:
                        seconds = step_time_s(name, size, precision, device, args.batch_size, args.warmup, args.steps)
                        threads = torch.get_num_threads()
                    else:
                        seconds, threads = group_step_time_s(num, name, size, precision, device, args.batch_size,
                                                             args.warmup, args.steps)
                    row = {"preset": name, "image_size": size, "channels": channels, "parameters": parameters,
                           "forward_flops_per_image": flops, "precision": precision, "processes": num,
                           "threads_per_process": threads, "step_ms": round(seconds * 1e3, 1),
                           "samples_per_s": round(num * args.batch_size / seconds, 1)}
                    rows.append(row)
                    print(f"{name:<10}{size:>6}{parameters / 1e6:>9.2f}M{flops / 1e9:>9.2f}{precision:>11}{num:>6}"
                          f"{threads:>8}{row['step_ms']:>10.1f}{row['samples_per_s']:>11.1f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}",
              "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
              "native_bf16": native_bf16, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": " ".join(["bench/presets.py", *sys.argv[1:]]), "batch_size": args.batch_size,
              "warmup_steps": args.warmup, "timed_steps": args.steps, "load_before": load_before,
              "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
