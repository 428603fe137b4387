"""Atomic checkpoints: a directory per step, written under a temporary name, fsynced, renamed.

Loading uses `torch.load(weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: model/optimizer/scheduler only; 2 adds EMA, scaler, RNG, data position
STATE_FILE = "state.pt"
STEP_PREFIX = "step-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write `state` to DIR/step-NNNNNNNN/ atomically and keep only the newest `keep` of them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{STEP_PREFIX}{step:08d}"
    temporary = directory / f".tmp-{STEP_PREFIX}{step:08d}-{os.getpid()}"
    for stale in directory.glob(f".tmp-{STEP_PREFIX}*"):  # left by a writer that was killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    temporary.mkdir()
    torch.save({**state, "format_version": FORMAT_VERSION, "step": step}, temporary / STATE_FILE)
    (temporary / "config.json").write_text(json.dumps(state.get("config", {}), indent=2))
    for child in temporary.iterdir():
        _fsync_path(child)
    _fsync_path(temporary)
    if final.exists():  # the same step saved twice (e.g. end of run on an interval): replace it
        shutil.rmtree(final)
    temporary.rename(final)
    _fsync_path(directory)
    for stale in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A state.pt path from a file, a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    candidates = [path, path / STATE_FILE]
    for root in (path, path / "checkpoints"):
        newest = latest_checkpoint(root)
        if newest is not None:
            candidates.append(newest / STATE_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {path} (looked for {STATE_FILE} and step-* directories)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint's state dict safely; a wrong format version is a clear error."""
    file = resolve_checkpoint(path)
    state = torch.load(file, map_location=map_location, weights_only=True)
    if state.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{file}: checkpoint format {state.get('format_version')!r}, expected one of "
                         f"{READABLE_VERSIONS}")
    return state


def load_model(path: str | Path):
    """(model in eval mode, TrainConfig, checkpoint state) from any checkpoint path.

    Uses the EMA weights when the checkpoint has them. A state dict that does not fit the stored
    config is reported with the mismatching keys.
    """
    from train.config import config_from_dict
    from train.model import build_model

    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    model = build_model(config.model)
    weights = state.get("ema") or state["model"]  # the EMA is what evaluation and export use
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not match its model config: {error}") from error
    return model.eval(), config, state
