"""Logging for a training job, configured once at the start of each process.

Every line carries the time and the rank. Our packages log at INFO on rank 0 (on every rank with
`--run.log_all_ranks`) and at WARNING on the others, so a failure on any rank still shows. Lines go
to stderr: stdout carries only each rank's JSON summary (scripts read it). Python warnings (bad
samples skipped, an unreadable checkpoint passed over) come out as log lines too.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

PACKAGES = ("pipeline", "train", "export")
FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
# MLflow's monitor announces each start and stop at INFO; only its problems are worth a line.
QUIETER = {"mlflow.system_metrics": logging.WARNING}


def configure_logging(rank: int, all_ranks: bool = False, stream: TextIO | None = None) -> None:
    """One stderr handler with time and rank; INFO from our packages on rank 0 (all ranks if asked)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for previous in root.handlers[:]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors only
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    for name, level in QUIETER.items():
        logging.getLogger(name).setLevel(level)
    warnings.showwarning = _log_warning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one log line (logging.captureWarnings would add the source line)."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)
