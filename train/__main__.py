"""`torchrun [--nproc_per_node=N] -m train [--config FILE.json] [--section.field=value ...]`."""

from __future__ import annotations

import json
import os
import sys

from train.config import ConfigError, help_text, parse_args
from train.presets import presets_help

USAGE = """usage: torchrun --standalone --nproc_per_node=N -m train [--config FILE.json] [--section.field=value ...]
       python -m train ...   (one process, no torchrun needed)

Trains the convolutional VAE on WebDataset shards written by `python -m pipeline shards`,
with DistributedDataParallel across the processes torchrun starts (gloo on CPU, NCCL on GPU),
bf16 autocast where supported, atomic checkpoints (resumed automatically) and MLflow tracking.
Each rank prints one JSON summary line at the end. A job started again resumes from the newest
checkpoint; SIGTERM saves a checkpoint and exits with 143.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n" + presets_help() + "\n\n" + help_text())
        return 0
    try:
        config = parse_args(argv)
    except (ConfigError, FileNotFoundError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a 2-core machine
    # shared with other processes, spinning threads made a training step 2.6x slower (567 -> 220 ms,
    # bench notes in BENCHMARKS.md); set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from train.distributed import setup_distributed, teardown_distributed
    from train.trainer import EXIT_PREEMPTED, run_training

    context = setup_distributed()
    try:
        summary = run_training(config, context)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error (rank {context.rank}): {error}", file=sys.stderr)
        return 1
    finally:
        teardown_distributed(context)
    print(json.dumps(summary), flush=True)
    return EXIT_PREEMPTED if summary.get("stopped_by") == "sigterm" else 0


if __name__ == "__main__":
    sys.exit(main())
