"""Training-step speed of each model preset at its intended image sizes: samples/s for forward,
backward and AdamW at batch 32, fp32 and bf16 autocast, one process, plus parameters and FLOPs.

A rough figure of what a preset costs, not a trainer benchmark (bench/train_speed.py is that): the
images are random 8-bit values (speed does not depend on them), 3 channels with the discretised
logistic likelihood (the conv preset: 1 channel, Bernoulli, as it is trained on digits). Each row
is the median step time over --steps timed steps after --warmup untimed ones.

    flock /tmp/vae-bench.lock .venv/bin/python bench/presets.py [--steps 20] [--presets resnet-s,resnet-m]
    .venv/bin/python bench/presets.py --device cuda   # the same on a GPU (bf16 autocast where supported)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
                warmup: int, steps: int) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of `preset` at `size` px."""
    channels, likelihood = (1, "bernoulli") if preset == "conv" else (3, "discretized_logistic")
    config = build_config({"model": {"preset": preset, "image_size": size, "channels": channels,
                                     "likelihood": likelihood}}).model
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
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
        loss = training_objective(vae_loss(params, x, posterior, model.likelihood), posterior, beta=1.0, free_bits=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/presets.json")
    args = parser.parse_args()
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; expected some of {list(PRESETS)}")
    device = torch.device(args.device)
    native_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    print(f"{'preset':<10}{'size':>6}{'params':>10}{'GFLOPs':>9}{'precision':>11}{'step ms':>10}{'samples/s':>11}")
    for name in names:
        sizes = [int(s) for s in args.sizes.split(",") if s] or list(PRESETS[name].measured_at)
        sizes = [s for s in sizes if not args.max_size or s <= args.max_size]
        for size in sizes:
            channels, likelihood = (1, "bernoulli") if name == "conv" else (3, "discretized_logistic")
            parameters, flops = preset_figures(name, size, channels, likelihood)
            for precision in args.precisions.split(","):
                seconds = step_time_s(name, size, precision, device, args.batch_size, args.warmup, args.steps)
                row = {"preset": name, "image_size": size, "channels": channels, "parameters": parameters,
                       "forward_flops_per_image": flops, "precision": precision, "step_ms": round(seconds * 1e3, 1),
                       "samples_per_s": round(args.batch_size / seconds, 1)}
                rows.append(row)
                print(f"{name:<10}{size:>6}{parameters / 1e6:>9.2f}M{flops / 1e9:>9.2f}{precision:>11}"
                      f"{row['step_ms']:>10.1f}{row['samples_per_s']:>11.1f}", flush=True)
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
