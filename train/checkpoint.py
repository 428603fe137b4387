"""Atomic checkpoints: a directory per step, written under a temporary name, fsynced, renamed.

Loading uses `torch.load(weights_only=True)`: a checkpoint is data, never code. Reading a run's
newest checkpoint passes over ones that cannot be read (truncated, garbage, not data) to the
previous complete one, with a warning; a directory whose name is not step-N is ignored, with a
warning.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: model/optimizer/scheduler only; 2 adds EMA, scaler, RNG, data position
STATE_FILE = "state.pt"
STEP_PREFIX = "step-"
STEP_NAME = re.compile(r"step-([0-9]+)")
TEMPORARY_PREFIX = f".tmp-{STEP_PREFIX}"


class CheckpointWarning(UserWarning):
    """A checkpoint directory entry that was passed over; the message names it and why."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk); its message names it and the cause."""

    def __str__(self) -> str:
        return str(self.strerror)


class UnreadableCheckpointError(ValueError):
    """A state.pt that torch cannot load as a checkpoint; the message names the file and the reason."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write `state` to DIR/step-NNNNNNNN/ atomically and keep only the newest `keep` of them.

    A write that fails (a full disk) removes its temporary directory, leaves every earlier
    checkpoint as it was and raises OSError naming the checkpoint and the cause.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{STEP_PREFIX}{step:08d}"
    temporary = directory / f"{TEMPORARY_PREFIX}{step:08d}-{os.getpid()}"
    for stale in directory.glob(f"{TEMPORARY_PREFIX}*"):  # left by a writer that was killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    # Serialised in memory first: torch.save writing to a file reports a full disk as an opaque
    # stream error ("basic_ios::clear", "unexpected pos"); Python's own write raises ENOSPC.
    buffer = io.BytesIO()
    torch.save({**state, "format_version": FORMAT_VERSION, "step": step}, buffer)
    try:
        temporary.mkdir()
        with open(temporary / STATE_FILE, "wb") as file:
            file.write(buffer.getbuffer())
        (temporary / "config.json").write_text(json.dumps(state.get("config", {}), indent=2))
        for child in temporary.iterdir():
            _fsync_path(child)
        _fsync_path(temporary)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)  # free what it took; the earlier ones stay
        cause = os.strerror(error.errno).lower() if error.errno else str(error)
        raise CheckpointWriteError(error.errno or errno.EIO,
                      f"{cause} writing checkpoint {final} ({len(buffer.getbuffer()) / 2**20:.1f} MiB); "
                      f"the previous checkpoints in {directory} are intact") from error
    del buffer
    if final.exists():  # the same step saved twice (e.g. end of run on an interval): replace it
        shutil.rmtree(final)
    temporary.rename(final)
    _fsync_path(directory)
    for stale in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _step_of(path: Path) -> int | None:
    match = STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first.

    Temporary directories are never listed; anything else that is not a step-N directory holding
    a state.pt is ignored with a CheckpointWarning (a stray `step-abc` must not stop a run).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.name.startswith(TEMPORARY_PREFIX):
            continue
        step = _step_of(path)
        if step is None or not path.is_dir():
            warnings.warn(f"ignoring {path}: not a checkpoint (expected directories named "
                          f"{STEP_PREFIX}NNNNNNNN)", CheckpointWarning, stacklevel=2)
        elif not (path / STATE_FILE).is_file():
            warnings.warn(f"ignoring {path}: no {STATE_FILE} in it", CheckpointWarning, stacklevel=2)
        else:
            found.append((step, path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None (it may still be unreadable: see load_latest)."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _load_failure(error: Exception) -> str:
    """torch.load's long error, cut to the part that says what is wrong with the file."""
    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0]
        return f"not loadable as data only, weights_only refused it: {detail.strip().split('. ')[0][:300]}"
    if isinstance(error, EOFError) or not text:
        return f"{type(error).__name__}: empty or cut short"
    return f"{type(error).__name__}: {text.split('. ')[0][:300]}"


def read_state(file: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """One state.pt, loaded as data only; anything unreadable is an UnreadableCheckpointError."""
    file = Path(file)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, MemoryError) as error:
        raise UnreadableCheckpointError(f"{file}: not a readable checkpoint ({_load_failure(error)})") from error
    if not isinstance(state, dict):
        raise UnreadableCheckpointError(f"{file}: not a readable checkpoint (holds a {type(state).__name__}, "
                                        "not a dict)")
    if state.get("format_version") not in READABLE_VERSIONS:
        raise UnreadableCheckpointError(f"{file}: checkpoint format {state.get('format_version')!r}, "
                                        f"expected one of {READABLE_VERSIONS}")
    return state


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """(step directory, state) of the newest checkpoint that loads, or None when there is none.

    An unreadable one is passed over for the one before it, with a CheckpointWarning; when
    checkpoints exist but none loads, that is an error (starting over would bury them).
    """
    found = list_checkpoints(directory)
    failures = []
    for path in reversed(found):
        try:
            return path, read_state(path / STATE_FILE, map_location)
        except UnreadableCheckpointError as error:
            failures.append(str(error))
            warnings.warn(f"{error}; trying the checkpoint before it", CheckpointWarning, stacklevel=2)
    if failures:
        raise UnreadableCheckpointError(f"no readable checkpoint in {directory}: " + "; ".join(failures)
                                        + " (move them away to start from scratch)")
    return None


class Checkpointer:
    """Saves the trainer state to checkpoints/ every `interval_steps` steps (and when asked).

    `save` is a collective (the state gathers every rank's noise generator): every rank calls it at
    the same step; rank 0 writes, then calls `after_save`. `extras()` is stored beside the state
    (the config, the MLflow run).
    """

    def __init__(self, directory: str | Path, state, is_main: bool, *, interval_steps: int, keep: int,
                 extras: Callable[[], dict], after_save: Callable[[], object] = lambda: None) -> None:
        self.directory, self.state, self.is_main = Path(directory), state, is_main
        self.interval_steps, self.keep, self.extras, self.after_save = interval_steps, keep, extras, after_save
        self.last_saved_step = state.position.step  # what is on disk already (resumed from or nothing)

    def should_run(self, step: int) -> bool:
        return step % self.interval_steps == 0 and step != self.last_saved_step

    def save(self) -> Path | None:
        """The checkpoint's directory on rank 0, None on the others."""
        payload = self.state.state_dict()
        step = self.last_saved_step = self.state.position.step
        if not self.is_main:
            return None
        path = save_checkpoint(self.directory, step, {**payload, **self.extras()}, keep=self.keep)
        self.after_save()
        return path


def _checkpoints_dir(path: Path) -> Path:
    """A run directory's checkpoints/ folder; any other directory as it is."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def resolve_checkpoint(path: str | Path) -> Path:
    """A state.pt path from a file, a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    for candidate in (path, path / STATE_FILE):
        if candidate.is_file():
            return candidate
    newest = latest_checkpoint(_checkpoints_dir(path))
    if newest is not None:
        return newest / STATE_FILE
    raise FileNotFoundError(f"no checkpoint at {path} (looked for {STATE_FILE} and step-* directories)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's state dict, loaded as data only.

    A state.pt or a step directory is loaded as it is (unreadable: a clear error); a checkpoints
    or run directory gives its newest readable checkpoint (see load_latest).
    """
    path = Path(path)
    for candidate in (path, path / STATE_FILE):
        if candidate.is_file():
            return read_state(candidate, map_location)
    loaded = load_latest(_checkpoints_dir(path), map_location) if path.is_dir() else None
    if loaded is None:
        raise FileNotFoundError(f"no checkpoint at {path} (looked for {STATE_FILE} and step-* directories)")
    return loaded[1]


def model_from_checkpoint(state: dict, weights: str = "ema", source: str | Path = "checkpoint"):
    """The VAE a checkpoint's state describes, in eval mode: its EMA weights when it has them
    (what evaluation and export use) or, with weights="raw", the optimizer's. A state dict that does
    not fit the stored config is a ValueError naming `source` and the mismatching keys."""
    from train.config import config_from_dict
    from train.model import build_model

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    model = build_model(config_from_dict(state["config"]).model)
    chosen = (state.get("ema") if weights == "ema" else None) or state["model"]
    try:
        model.load_state_dict(chosen)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {source} does not match its model config: {error}") from error
    return model.eval()


def load_model(path: str | Path, weights: str = "ema"):
    """A trained VAE in eval mode from a save_pretrained directory (model.safetensors + config.json)
    or any checkpoint path (a state.pt, a step, checkpoints or run directory: see load_checkpoint)."""
    from train.model import VAE, WEIGHTS_FILE

    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return VAE.from_pretrained(path)
    return model_from_checkpoint(load_checkpoint(path), weights, path)
