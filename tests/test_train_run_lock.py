"""The run-directory lock, between real processes: a second holder is refused with the first one's
pid; a holder killed with SIGKILL frees it at once, though the child it forked (as a DataLoader
worker is forked) lives on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, subprocess_env
from train.run_lock import RunDirInUseError, RunDirLock

HOLDER = """
import os, sys, time
from train.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1])
if os.fork() == 0:  # a loader worker: outlives its parent by a few seconds
    time.sleep(30)
    os._exit(0)
print("locked", flush=True)
time.sleep(300)
"""


def test_a_second_writer_is_refused_and_a_killed_holder_frees_the_directory_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    children: list[psutil.Process] = []
    try:
        assert holder.stdout.readline().strip() == "locked"
        children = psutil.Process(holder.pid).children()
        with pytest.raises(RunDirInUseError, match=f"in use by another trainer \\(pid {holder.pid} on "):
            RunDirLock(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert children and all(child.is_running() for child in children)  # the forked child lives on
        started = time.monotonic()
        lock = RunDirLock(tmp_path)  # ... and does not hold the lock
        assert time.monotonic() - started < 1.0
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
        for child in children:
            if child.is_running():
                child.kill()
