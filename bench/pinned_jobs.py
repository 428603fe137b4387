"""Side-by-side runs for the quality benchmarks: several commands started at once, each pinned to its own
core with a fixed number of torch threads, so systems trained "for the same budget" get the same machine."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_flags(fields: dict) -> list[str]:
    """`python -m train` flags for model fields (lists as comma-separated values)."""
    return [f"--model.{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
            for key, value in fields.items()]


def pinned(command: list[str], core: str, threads: int) -> tuple[list[str], dict[str, str]]:
    """The command under `taskset -c CORE` (if a core is given) and an environment with THREADS torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    return (["taskset", "-c", core, *command] if core else command), env


def run_all(jobs: dict[str, list[str]], cores: dict[str, str], threads: int, work: Path) -> dict[str, float]:
    """Start every job at once (pinned; output in WORK/NAME.log), wait for all; raise naming a job that
    failed, with the end of its log. Returns each job's wall seconds."""
    started, processes = time.monotonic(), {}
    for name, command in jobs.items():
        command, env = pinned(command, cores.get(name, ""), threads)
        log = open(work / f"{name}.log", "w")
        print(f"[{name}] {shlex.join(command)}", flush=True)
        processes[name] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log)
    walls = {}
    for name, (process, log) in processes.items():
        code = process.wait()
        log.close()
        walls[name] = round(time.monotonic() - started, 1)
        if code != 0:
            tail = (work / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"{name} exited with {code}; the end of {work / f'{name}.log'}:\n{tail}")
    return walls


def trainer_checkpoints(run_dir: Path) -> list[tuple[float, int, Path]]:
    """(training seconds, step, path) of every checkpoint `python -m train` wrote under run_dir, oldest first."""
    import torch

    found = []
    for path in sorted((run_dir / "checkpoints").glob("step-*")):
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        found.append((float(state["position"]["elapsed_s"]), int(state["step"]), path))
    return sorted(found)


def last_json_line(log: Path) -> dict:
    """The summary `python -m train` prints last."""
    import json

    return json.loads(log.read_text().strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
