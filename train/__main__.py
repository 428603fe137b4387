"""`torchrun [--nproc_per_node=N] -m train [--config FILE.json] [--section.field=value ...]`."""

from __future__ import annotations

import json
import os
import sys

from pipeline.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from train.config import ConfigError, help_text, parse_args
from train.presets import presets_help

USAGE = """usage: torchrun --standalone --nproc_per_node=N -m train [--config FILE.json] [--section.field=value ...]
       python -m train ...   (one process, no torchrun needed)

Trains the convolutional VAE on WebDataset shards written by `python -m pipeline shards`,
with DistributedDataParallel across the processes torchrun starts (gloo on CPU, NCCL on GPU),
bf16 autocast where supported, atomic checkpoints (resumed automatically) and MLflow tracking.
Each rank prints one JSON summary line at the end. A job started again resumes from the newest
checkpoint (an unreadable newest one is passed over, with a warning). SIGTERM saves a checkpoint
and exits with 143; under torchrun use `python -m train.launch` (torchrun's flags) so that the
launcher, too, exits 143 rather than 1. One trainer per --run.out_dir: a second one is refused.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n" + presets_help() + "\n\n" + help_text())
        return EXIT_OK
    try:
        config = parse_args(argv)
    except (ConfigError, FileNotFoundError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a 2-core machine
    # shared with other processes, spinning threads made a training step 2.6x slower (567 -> 220 ms,
    # bench notes in BENCHMARKS.md); set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from train.distributed import setup_distributed, teardown_distributed
    from train.run_lock import RunDirInUseError
    from train.trainer import EXIT_PREEMPTED, run_training

    context = setup_distributed()
    try:
        summary = run_training(config, context)
    # OSError: shards that cannot be opened, a full disk while checkpointing (the message says which)
    except (ValueError, OSError, FloatingPointError, RunDirInUseError) as error:
        print(f"error (rank {context.rank}): {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        teardown_distributed(context)
    print(json.dumps(summary), flush=True)
    return EXIT_PREEMPTED if summary.get("stopped_by") == "sigterm" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
