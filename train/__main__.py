"""`torchrun [--nproc_per_node=N] -m train [--config FILE] [--section.field VALUE ...]`."""

from __future__ import annotations

import json
import logging
import os
import sys

from pipeline.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from train.config import ConfigError, config_yaml, parse_command_line
from train.presets import presets_help

DESCRIPTION = """\
Trains the VAE on WebDataset shards written by `python -m pipeline shards`, with
DistributedDataParallel across the processes torchrun starts (gloo on CPU, NCCL on GPU), bf16
autocast where supported, atomic checkpoints (resumed automatically) and MLflow tracking.
`python -m train ...` runs one process, no torchrun needed.

The config: defaults <- --config FILE (YAML or JSON, {section: {field: value}}; several apply in
order) <- flags, as --section.field=VALUE or --section.field VALUE. --print_config prints the
resolved config as YAML, a file --config reads back.

Log lines (time, rank, level) go to stderr, from rank 0 unless --run.log_all_ranks=true; each rank
prints one JSON summary line on stdout at the end. A job started again resumes from the newest
checkpoint (an unreadable newest one is passed over, with a warning). SIGTERM saves a checkpoint
and exits with 143; under torchrun use `python -m train.launch` (torchrun's flags) so that the
launcher, too, exits 143 rather than 1. One trainer per --run.out_dir: a second one is refused.

"""

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, print_config = parse_command_line(argv, DESCRIPTION + presets_help())
    except ConfigError as error:  # a usage error, answered before any logging, as argparse does
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if print_config:
        print(config_yaml(config), end="")
        return EXIT_OK

    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a 2-core machine
    # shared with other processes, spinning threads made a training step 2.6x slower (567 -> 220 ms,
    # bench notes in BENCHMARKS.md); set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from train.distributed import setup_distributed, teardown_distributed
    from train.logs import configure_logging
    from train.run_lock import RunDirInUseError
    from train.trainer import EXIT_PREEMPTED, run_training

    context = setup_distributed()
    configure_logging(context.rank, config.run.log_all_ranks)
    try:
        summary = run_training(config, context)
    # OSError: shards that cannot be opened, a full disk while checkpointing (the message says which)
    except (ValueError, OSError, FloatingPointError, RunDirInUseError) as error:
        log.error("%s", error)
        return EXIT_FAILURE
    finally:
        teardown_distributed(context)
    print(json.dumps(summary), flush=True)  # the job's result, not a log line: stdout, every rank
    return EXIT_PREEMPTED if summary.get("stopped_by") == "sigterm" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
