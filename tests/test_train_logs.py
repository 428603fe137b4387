"""The trainer's log lines: time and rank on each, rank 0 only unless --run.log_all_ranks, warnings too."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO, VENV_BIN, subprocess_env

SCRIPT = """
import io, logging, sys, warnings
from train.logs import configure_logging
for rank, all_ranks in ((0, False), (1, False), (1, True)):
    stream = io.StringIO()
    configure_logging(rank, all_ranks, stream)
    logging.getLogger("train.trainer").info("progress")
    logging.getLogger("pipeline.loader").warning("skipped 3 samples")
    logging.getLogger("some.library").info("chatter")
    warnings.warn("a python warning")
    print(f"--- {rank} {all_ranks}")
    print(stream.getvalue(), end="")
"""
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank (\d)\] (INFO|WARNING) ([\w.]+): (.*)$")


def test_rank_zero_logs_progress_other_ranks_only_problems_unless_asked():
    result = subprocess.run([str(VENV_BIN / "python"), "-W", "always", "-c", SCRIPT], cwd=REPO,
                            env={**subprocess_env(), "PYTHONWARNINGS": "always"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    blocks = {}
    for block in result.stdout.split("--- ")[1:]:
        header, *lines = block.splitlines()
        blocks[header] = [LINE.match(line).groups() for line in lines]  # every line: time, rank, level
    assert blocks["0 False"] == [("0", "INFO", "train.trainer", "progress"),
                                 ("0", "WARNING", "pipeline.loader", "skipped 3 samples"),
                                 ("0", "WARNING", "py.warnings", "UserWarning: a python warning")]
    assert blocks["1 False"] == [("1", "WARNING", "pipeline.loader", "skipped 3 samples"),
                                 ("1", "WARNING", "py.warnings", "UserWarning: a python warning")]
    assert [line[:2] for line in blocks["1 True"]] == [("1", "INFO"), ("1", "WARNING"), ("1", "WARNING")]
