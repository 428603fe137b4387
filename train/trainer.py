"""The training loop: build, resume, loop over steps, evaluate/log/save at intervals, tear down.

Each component owns its cadence (`should_run(step)`): the metric window (train.metrics), the
checkpointer (train.checkpoint), the evaluator (train.evaluate); the stop decision is
train.stopping's; everything a checkpoint restores is one TrainState (train.state).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.cli import EXIT_PREEMPTED  # noqa: F401  (train.__main__ reads it here: 128 + SIGTERM)
from pipeline.data import open_train_val
from pipeline.errors import ErrorBudget
from pipeline.loader import ShardSet, batches_per_epoch, iter_eval_batches, make_train_loader
from train.checkpoint import Checkpointer
from train.config import TrainConfig, binarizes, config_to_dict
from train.distributed import DistContext, all_reduce_sum
from train.evaluate import Evaluator, binarize
from train.likelihood import Likelihood
from train.loss import training_objective, vae_loss
from train.metrics import MetricWindow, progress_line
from train.precision import autocast, resolve_precision
from train.run_lock import RunDirInUseError, RunDirLock
from train.state import TrainState, resume
from train.stopping import PreemptionFlag, StopConditions
from train.tracking import make_tracker, readable_run_name

log = logging.getLogger(__name__)
PRETRAINED_DIR = "model"  # RUN/model: the finished run's model, save_pretrained style


def lr_factor(step: int, progress: float, config: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 to min_lr_ratio as progress goes 0 -> 1."""
    warmup = config.optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = config.optim.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def kl_weight(step: int, config: TrainConfig) -> float:
    """beta, ramped linearly from 0 over kl_warmup_steps."""
    warmup = config.optim.kl_warmup_steps
    return config.optim.beta * (min(1.0, (step + 1) / warmup) if warmup else 1.0)


def check_data_matches_model(config: TrainConfig, image_shape: tuple[int, int, int]) -> None:
    expected = (config.model.image_size, config.model.image_size, config.model.channels)
    if tuple(image_shape) != expected:
        raise ValueError(
            f"shards hold {image_shape[0]}x{image_shape[1]}x{image_shape[2]} images but the model "
            f"expects {expected[0]}x{expected[1]}x{expected[2]}: set --model.image_size and "
            "--model.channels to match the manifest")


def train_step(wrapped, likelihood: Likelihood, optimizer, scaler, x: torch.Tensor, generator: torch.Generator,
               config: TrainConfig, precision: str, beta: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, unscale and clip (no optimizer step, no host sync).

    Returns ([neg-ELBO, recon, KL] batch sums in fp32, grad norm); the caller checks the norm and steps.
    """
    with autocast(precision, x.device):
        params, posterior = wrapped(x, generator)
    terms = vae_loss(params, x, posterior, likelihood)
    loss = training_objective(terms, posterior, beta=beta, free_bits=config.optim.free_bits)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    sums = torch.stack([(terms.recon + terms.kl).sum(), terms.recon.sum(), terms.kl.sum()]).detach()
    return sums, grad_norm


def training_batches(loader, state: TrainState) -> Iterator[torch.Tensor]:
    """uint8 batches from the state's data position on, epoch after epoch; counts each batch taken.

    An epoch's batches resume at position.batch_in_epoch; the loop moves the position to the next
    epoch (Position.roll_epoch), which starts the next pass here.
    """
    position = state.position
    while True:
        loader.dataset.epoch = position.epoch
        for images, *_ in itertools.islice(loader, position.batch_in_epoch, state.num_batches):
            position.batch_in_epoch += 1
            yield images


def first_val_images(val_shards: ShardSet, count: int = 64) -> torch.Tensor:
    """The first `count` validation images (uint8), for the image grids."""
    for images, _, mask in iter_eval_batches(val_shards, batch_size=count, rank=0, world_size=1):
        return images[mask]
    raise ValueError("the validation split is empty")


def lock_run_dir(out_dir: str, context: DistContext) -> RunDirLock | None:
    """Rank 0 (the one that writes the run directory) locks it; when it cannot, every rank raises."""
    lock, refusal = None, ""
    if context.is_main:
        try:
            lock = RunDirLock(out_dir)
        except RunDirInUseError as error:
            refusal = str(error)
    refused = all_reduce_sum(torch.tensor([float(bool(refusal))], device=context.device), context)
    if refused.item() > 0:
        raise RunDirInUseError(refusal or f"rank 0 could not lock run directory {out_dir} (see its error)")
    return lock


@contextlib.contextmanager
def _log_output():
    """In-process use (tests, notebooks) with no handler writing to stderr: show the trainer's INFO
    lines there for the length of the run. `python -m train` sets up its own handlers."""
    logger = logging.getLogger("train")
    chain, current = [], logger
    while current is not None:
        chain += current.handlers
        current = current.parent if current.propagate else None
    if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__) for h in chain):
        yield
        return
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_training(config: TrainConfig, context: DistContext) -> dict:
    """Train until a step, epoch or time limit (or SIGTERM); returns a summary dict (printed by every rank).

    The run directory is locked for the whole run: a second trainer on it is refused.
    """
    with _log_output():
        lock = lock_run_dir(config.run.out_dir, context)
        try:
            return _train(config, context)
        finally:
            if lock is not None:
                lock.release()


def _train(config: TrainConfig, context: DistContext) -> dict:
    torch.manual_seed(config.run.seed)
    precision = resolve_precision(config.run.precision, context.device)
    data, model_shape = config.data, (config.model.image_size, config.model.image_size, config.model.channels)
    train_shards, val_shards = open_train_val(
        data.shards, image_shape=model_shape, image_key=data.image_key, label_key=data.label_key,
        samples_per_epoch=data.samples_per_epoch, val_location=data.val_shards, announce=context.is_main)
    if train_shards.decoder is None:  # our own shards hold one size; foreign ones are fitted to the model
        check_data_matches_model(config, train_shards.manifest.image_shape)
    num_batches = batches_per_epoch(train_shards.num_samples, config.data.batch_size, context.world_size)
    state = TrainState(config, context, precision, num_batches)
    run_dir = Path(config.run.out_dir)
    run_id = resume(state, run_dir / "checkpoints", context).get("mlflow_run_id")

    wrapped = DistributedDataParallel(state.model) if context.is_distributed else state.model
    if config.run.compile:
        wrapped = torch.compile(wrapped)
    tags = {"world_size": str(context.world_size), "backend": context.backend, "precision": precision,
            "device": str(context.device), "torch": torch.__version__, "likelihood": config.model.likelihood}
    tracker = make_tracker(config, context.is_main, tags, run_id,
                           readable_run_name(config, context.world_size, precision), dataset=train_shards)
    error_budget = ErrorBudget(config.data.max_bad_samples, config.data.max_bad_fraction)  # training and evaluation
    loader = make_train_loader(train_shards, batch_size=config.data.batch_size, rank=context.rank,
                               world_size=context.world_size, seed=config.run.seed,
                               num_workers=config.data.num_workers, error_budget=error_budget)
    checkpoints = Checkpointer(
        run_dir / "checkpoints", state, context.is_main, interval_steps=config.run.checkpoint_interval_steps,
        keep=config.run.keep_checkpoints,
        extras=lambda: {"config": config_to_dict(config), "mlflow_run_id": tracker.run_id},
        # flushed after each save, so a crash after it loses no logged metric
        after_save=lambda: getattr(tracker, "healthy", False) and tracker.flush(timeout_s=10.0))
    evaluator = Evaluator(state.eval_model, val_shards, context, tracker, config, precision=precision,
                          error_budget=error_budget, last_step=state.position.step,
                          grid_images=first_val_images(val_shards).to(context.device).float().div_(255.0))
    window = MetricWindow(context, tracker, interval_steps=config.run.log_interval_steps,
                          data_errors=loader.dataset.errors,  # counted across worker processes
                          with_system_metrics=config.run.system_metrics)
    stop = StopConditions(config, context, num_batches, state.position)
    status = "FAILED"
    try:
        with PreemptionFlag() as preempted:  # held through the final save and evaluation
            stopped_by, val_metrics = _loop(state, wrapped, loader, checkpoints, evaluator, window, stop,
                                            preempted, precision)
            final = checkpoints.save()  # before the final evaluation, which reads validation data that may fail
            if stopped_by == "sigterm":
                status = "KILLED"
            else:
                if final is not None:
                    tracker.log_artifacts(final, "checkpoint")
                    pretrained = state.eval_model.save_pretrained(run_dir / PRETRAINED_DIR)
                    tracker.log_artifacts(pretrained, PRETRAINED_DIR)
                    log.info("model saved to %s (train.load_model or VAE.from_pretrained reads it)", pretrained)
                val_metrics = evaluator.run(state.position.step, config.run.final_iwae_samples)
                status = "FINISHED"
    finally:
        tracker.close(status)
    position = state.position
    return {"rank": context.rank, "world_size": context.world_size, "steps": position.step,
            "epochs": round(position.epochs(num_batches), 4), "precision": precision,
            "skipped_steps": position.skipped_steps, "stopped_by": stopped_by,
            "seconds": round(stop.elapsed_s(), 2), "mlflow_run_id": tracker.run_id, **val_metrics}


def _loop(state: TrainState, wrapped, loader, checkpoints: Checkpointer, evaluator: Evaluator,
          window: MetricWindow, stop: StopConditions, preempted: PreemptionFlag, precision: str
          ) -> tuple[str, dict[str, float]]:
    """Train until a limit or SIGTERM; returns why it stopped and the last periodic validation metrics.

    Distributed invariants (a rank that skips a collective the others make hangs them all):
    - every rank runs the same steps: DDP all-reduces the gradients in backward, so the grad norm,
      and with it the finite/skip decision, is the same everywhere;
    - `stop.check` is the one collective of every step: SIGTERM on any rank and rank 0's clock, summed;
    - the window, the checkpointer and the evaluator decide from the step and that shared stop
      decision only, so their collectives (metric sums, RNG states, validation sums) line up;
    - only writing (checkpoint files, MLflow, log lines, image grids) checks is_main.
    """
    config, context, position = state.config, state.context, state.position
    binarize_inputs, global_batch = binarizes(config), config.data.batch_size * context.world_size
    batches = training_batches(loader, state)
    stopped_by, val_metrics = ("steps" if stop.steps_reached(position) else ""), {}
    while not stopped_by:
        with window.timing_wait():
            images = next(batches)
        x = images.to(context.device, non_blocking=True).float().div_(255.0)  # uint8 crossed the bus
        if binarize_inputs:
            x = binarize(x, state.generator)
        state.set_lr(config.optim.lr * lr_factor(position.step, stop.progress(position), config))
        beta = kl_weight(position.step, config)
        sums, grad_norm = train_step(wrapped, state.model.likelihood, state.optimizer, state.scaler, x,
                                     state.generator, config, precision, beta)
        if state.apply_gradients(grad_norm):
            window.add(sums, images.shape[0])
        stopped_by = stop.check(position, preempted)
        position.roll_epoch(state.num_batches)
        if window.should_run(position.step, stopping=bool(stopped_by)):
            metrics = window.log(position.step, {
                "train/beta": beta, "train/lr": state.optimizer.param_groups[0]["lr"],
                "train/grad_norm": float(grad_norm), "train/skipped_steps": position.skipped_steps,
                "train/epoch": position.epochs(state.num_batches)})
            if context.is_main:
                log.info(progress_line(position.step, metrics, step_limit=stop.step_limit,
                                       eta_s=stop.eta_s(position, metrics["train/samples_per_s"] / global_batch)))
        if stopped_by:
            break
        with window.paused():
            # Save before evaluating: bad validation data must not cost the steps since the last save.
            if checkpoints.should_run(position.step):
                checkpoints.save()
            if evaluator.should_run(position.step):
                val_metrics = evaluator.run(position.step, config.run.iwae_samples)
    return stopped_by, val_metrics
