"""The training loop: build, resume, loop over steps, evaluate/log/save at intervals, tear down."""

from __future__ import annotations

import copy
import itertools
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.images import make_grid
from pipeline.data import open_train_val
from pipeline.errors import DataErrors, ErrorBudget
from pipeline.loader import ShardSet, batches_per_epoch, iter_eval_batches, make_train_loader
from train.checkpoint import load_latest, save_checkpoint
from train.config import TrainConfig, binarizes, config_to_dict
from train.distributed import DistContext, all_reduce_sum
from train.evaluate import binarize, evaluate, interpolation_images, sample_grid_images
from train.loss import training_objective, vae_loss
from train.model import ConvVAE, build_model
from train.precision import autocast, make_grad_scaler, resolve_precision
from train.run_lock import RunDirInUseError, RunDirLock
from train.tracking import make_tracker, readable_run_name, system_metrics

from pipeline.cli import EXIT_PREEMPTED  # 128 + SIGTERM, what Kubernetes and torchrun expect


@dataclass
class Position:
    """Where the job is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0


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


class PreemptionFlag:
    """Set by SIGTERM (Kubernetes preemption, torchrun stopping workers, the torchrun agent's
    death) or by `request`; read once per step, agreed on by every rank, then: save, exit 143.

    A second SIGTERM exits at once, for a process stuck where the flag is never read.
    """

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def request(self, reason: str) -> None:
        self.set = True
        print(f"{reason}: saving a checkpoint at the end of this step, then exiting", file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise SystemExit(EXIT_PREEMPTED)
        self.request("SIGTERM")

    def __enter__(self) -> PreemptionFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (in-process use): no handler, no preemption
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def update_ema(ema: ConvVAE, model: ConvVAE, step: int, decay: float) -> None:
    """ema <- d * ema + (1 - d) * model, with d ramped up early so the first weights wash out fast."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        ema_params = [p for p in ema.parameters()]
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - d)


def gather_rng_states(generator: torch.Generator, context: DistContext) -> list[torch.Tensor]:
    """Every rank's noise-generator state, on every rank (a collective: all ranks call it)."""
    state = generator.get_state()
    if not context.is_distributed:
        return [state]
    states: list = [None] * context.world_size
    dist.all_gather_object(states, state)
    return states


def train_step(wrapped, optimizer, scaler, x: torch.Tensor, generator: torch.Generator,
               config: TrainConfig, precision: str, beta: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, unscale and clip (no optimizer step, no host sync).

    Returns ([neg-ELBO, recon, KL] batch sums in fp32, grad norm); the caller checks the norm and steps.
    """
    model_config = config.model
    with autocast(precision, x.device):
        params, posterior = wrapped(x, generator)
    terms = vae_loss(params, x, posterior, model_config.likelihood, model_config.gaussian_sigma)
    loss = training_objective(terms, posterior, beta=beta, free_bits=config.optim.free_bits)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    sums = torch.stack([(terms.recon + terms.kl).sum(), terms.recon.sum(), terms.kl.sum()]).detach()
    return sums, grad_norm


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


def agree_on_resume_step(step: int, checkpoint_dir: Path, context: DistContext) -> None:
    """Every rank must continue from the same checkpoint (a collective: all ranks call it)."""
    if not context.is_distributed:
        return
    bounds = torch.tensor([step, -step], dtype=torch.float64, device=context.device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0] != -bounds[1]:
        raise ValueError(f"ranks found different newest checkpoints in {checkpoint_dir} (steps "
                         f"{-bounds[1]:.0f} to {bounds[0]:.0f}); is it on a filesystem every rank sees alike?")


def run_training(config: TrainConfig, context: DistContext) -> dict:
    """Train until a step, epoch or time limit (or SIGTERM); returns a summary dict (printed by every rank).

    The run directory is locked for the whole run: a second trainer on it is refused.
    """
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
    step_limits = [config.run.max_steps] if config.run.max_steps else []
    if config.run.max_epochs:
        step_limits.append(math.ceil(config.run.max_epochs * num_batches))
    schedule_steps = min(step_limits) if step_limits else None  # None: the schedule follows the clock

    model: ConvVAE = build_model(config.model).to(context.device)
    ema = copy.deepcopy(model).requires_grad_(False) if config.optim.ema_decay > 0 else None
    eval_model = ema if ema is not None else model  # evaluation and export use the EMA
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    scaler = make_grad_scaler(precision, context.device)
    generator = torch.Generator(device=context.device).manual_seed(config.run.seed * 7919 + 1 + context.rank)
    position = Position()
    checkpoint_dir = Path(config.run.out_dir) / "checkpoints"
    run_id = None
    loaded = load_latest(checkpoint_dir, map_location=context.device)  # unreadable ones: warned, passed over
    if loaded is not None:
        resume_from, state = loaded
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state.get("ema") or state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler") or {})
        saved = state.get("position") or {"step": state["step"], "epoch": state.get("epoch", -1) + 1}
        position = Position(**saved)
        saved_world = state.get("world_size", context.world_size)
        if saved_world != context.world_size:  # batches per epoch changed: keep the share of the epoch
            position.batch_in_epoch = min(num_batches - 1, position.batch_in_epoch * saved_world // context.world_size)
            if context.is_main:
                print(f"resuming {saved_world} ranks' checkpoint on {context.world_size}: data order and "
                      "noise continue approximately, not exactly", file=sys.stderr, flush=True)
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if len(rng.get("generators", [])) == context.world_size:  # same world size: exact continuation
            generator.set_state(rng["generators"][context.rank].cpu())
        run_id = state.get("mlflow_run_id")
        if context.is_main:
            print(f"resumed from {resume_from} at step {position.step}", file=sys.stderr, flush=True)
    agree_on_resume_step(position.step, checkpoint_dir, context)

    wrapped = DistributedDataParallel(model) if context.is_distributed else model
    if config.run.compile:
        wrapped = torch.compile(wrapped)
    tags = {"world_size": str(context.world_size), "backend": context.backend, "precision": precision,
            "device": str(context.device), "torch": torch.__version__,
            "likelihood": config.model.likelihood}
    tracker = make_tracker(config, context.is_main, tags, run_id,
                           readable_run_name(config, context.world_size, precision), dataset=train_shards)
    error_budget = ErrorBudget(config.data.max_bad_samples, config.data.max_bad_fraction)  # training and evaluation
    loader = make_train_loader(train_shards, batch_size=config.data.batch_size, rank=context.rank,
                               world_size=context.world_size, seed=config.run.seed,
                               num_workers=config.data.num_workers, error_budget=error_budget)
    binarize_inputs = binarizes(config)
    data_errors = loader.dataset.errors  # skipped samples and bad shards, counted across worker processes
    grid_images = first_val_images(val_shards).to(context.device).float().div_(255.0)

    def save() -> Path | None:
        rng = {"torch": torch.get_rng_state(), "generators": gather_rng_states(generator, context)}
        if not context.is_main:
            return None
        path = save_checkpoint(checkpoint_dir, position.step, {
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "position": asdict(position), "epoch": position.epoch, "rng": rng,
            "world_size": context.world_size, "config": config_to_dict(config),
            "mlflow_run_id": tracker.run_id,
        }, keep=config.run.keep_checkpoints)
        if getattr(tracker, "healthy", False):  # so a crash after this loses no logged metric
            tracker.flush(timeout_s=10.0)
        return path

    def evaluate_and_log(iwae_samples: int) -> dict[str, float]:
        metrics = evaluate(eval_model, val_shards, context, batch_size=config.data.eval_batch_size,
                           precision=precision, seed=config.run.seed + 1234, iwae_samples=iwae_samples,
                           iwae_chunk=config.run.iwae_chunk, binarize_inputs=binarizes(config),
                           errors=DataErrors(error_budget))
        tracker.log_metrics(metrics, position.step)
        if context.is_main:
            samples, pairs = sample_grid_images(eval_model, grid_images, num_samples=64, seed=config.run.seed)
            tracker.log_image(make_grid(samples, 8), "samples", position.step)
            tracker.log_image(make_grid(pairs, 8), "reconstructions", position.step)
            tracker.log_image(make_grid(interpolation_images(eval_model, grid_images), 10),
                              "interpolations", position.step)
            shown = {k: round(v, 3) for k, v in metrics.items()}
            print(f"step {position.step}: {shown}", file=sys.stderr, flush=True)
        return metrics

    def step_limit_reached() -> bool:
        return (bool(config.run.max_steps) and position.step >= config.run.max_steps) or (
            bool(config.run.max_epochs)
            and position.epoch + position.batch_in_epoch / num_batches >= config.run.max_epochs)

    started = time.monotonic() - position.elapsed_s
    window = torch.zeros(3, dtype=torch.float64, device=context.device)
    window_images, window_start, window_wait, consecutive_skips = 0, time.perf_counter(), 0.0, 0
    val_metrics: dict[str, float] = {}
    stopped_by = "steps" if step_limit_reached() else ""
    status = "FAILED"
    rank0_elapsed = position.elapsed_s
    grad_norm = torch.zeros(())
    try:
        with PreemptionFlag() as preempted:
            while not stopped_by:
                loader.dataset.epoch = position.epoch
                batches = itertools.islice(loader, position.batch_in_epoch, num_batches)
                while not stopped_by:
                    wait_start = time.perf_counter()
                    images = next(batches, None)
                    if images is None:
                        break
                    images = images[0]
                    window_wait += time.perf_counter() - wait_start
                    position.batch_in_epoch += 1
                    x = images.to(context.device, non_blocking=True).float().div_(255.0)  # uint8 crossed the bus
                    if binarize_inputs:
                        x = binarize(x, generator)
                    progress = (position.step / schedule_steps if schedule_steps
                                else rank0_elapsed / config.run.max_time_s)
                    for group in optimizer.param_groups:
                        group["lr"] = config.optim.lr * lr_factor(position.step, progress, config)
                    beta = kl_weight(position.step, config)
                    sums, grad_norm = train_step(wrapped, optimizer, scaler, x, generator, config,
                                                 precision, beta)
                    # One host sync per step; gradients are all-reduced, so every rank decides alike.
                    finite = bool(torch.isfinite(grad_norm))
                    if finite:
                        scaler.step(optimizer)
                        scaler.update()
                        if ema is not None:
                            update_ema(ema, model, position.step, config.optim.ema_decay)
                        position.step += 1
                        consecutive_skips = 0
                        window += sums.double()
                        window_images += images.shape[0]
                    else:
                        scaler.update()  # fp16: lowers the scale; otherwise a no-op
                        optimizer.zero_grad(set_to_none=True)
                        position.skipped_steps += 1
                        consecutive_skips += 1
                        if consecutive_skips >= config.run.max_consecutive_skips:
                            raise FloatingPointError(
                                f"non-finite loss or gradients for {consecutive_skips} steps in a row, "
                                f"the last at step {position.step} (epoch {position.epoch}, batch "
                                f"{position.batch_in_epoch}); lower optim.lr or check the data")
                    if not preempted.set and context.agent_gone():  # torchrun was SIGKILLed: stop as for SIGTERM
                        preempted.request(f"the torchrun agent (pid {context.agent_pid}) is gone")
                    # Stop decisions are shared: SIGTERM on any rank and rank 0's clock, summed.
                    flags = torch.tensor([float(preempted.set),
                                          time.monotonic() - started if context.is_main else 0.0])
                    if context.is_distributed:
                        flags = all_reduce_sum(flags.to(context.device), context).cpu()
                    rank0_elapsed = float(flags[1])
                    position.elapsed_s = rank0_elapsed
                    if flags[0] > 0:
                        stopped_by = "sigterm"
                    elif config.run.max_time_s and rank0_elapsed >= config.run.max_time_s:
                        stopped_by = "time"
                    elif step_limit_reached():
                        stopped_by = "steps"
                    if position.batch_in_epoch == num_batches:
                        position.epoch += 1
                        position.batch_in_epoch = 0
                    if window_images and (position.step % config.run.log_interval_steps == 0 or stopped_by):
                        data = [data_errors.num_skipped_samples, data_errors.num_bad_shards,
                                data_errors.num_read_samples]  # this start's counts, every rank's summed
                        totals = all_reduce_sum(torch.cat([window, window.new_tensor(
                            [window_images, window_wait, *data])]), context)
                        elapsed = time.perf_counter() - window_start
                        nelbo, recon, kl = (totals[:3] / totals[3]).tolist()
                        metrics = {"train/neg_elbo": nelbo, "train/recon": recon, "train/kl": kl,
                                   "train/beta": beta, "train/lr": optimizer.param_groups[0]["lr"],
                                   "train/grad_norm": float(grad_norm),
                                   "train/samples_per_s": totals[3].item() / elapsed,
                                   "train/data_wait_share": totals[4].item() / context.world_size / elapsed,
                                   "train/skipped_steps": position.skipped_steps,
                                   "train/epoch": position.epoch + position.batch_in_epoch / num_batches,
                                   "data/skipped_samples": totals[5].item(), "data/bad_shards": totals[6].item(),
                                   "data/read_samples": totals[7].item()}
                        if config.run.system_metrics and context.is_main:
                            metrics.update(system_metrics(context.device))
                        tracker.log_metrics(metrics, position.step)
                        window.zero_()
                        window_images, window_wait, window_start = 0, 0.0, time.perf_counter()
                    if stopped_by:
                        break
                    pause_start = time.perf_counter()
                    # Save before evaluating: bad validation data must not cost the steps since the last save.
                    if position.step % config.run.checkpoint_interval_steps == 0 and finite:
                        save()
                    if position.step % config.run.eval_interval_steps == 0 and finite:
                        val_metrics = evaluate_and_log(config.run.iwae_samples)
                    window_start += time.perf_counter() - pause_start  # samples/s counts training only
            if stopped_by == "sigterm":
                save()
                status = "KILLED"
            else:
                final = save()  # before the final evaluation, which reads validation data that may fail
                if final is not None:
                    tracker.log_artifacts(final, "checkpoint")
                val_metrics = evaluate_and_log(config.run.final_iwae_samples)
                status = "FINISHED"
    finally:
        tracker.close(status)
    return {"rank": context.rank, "world_size": context.world_size, "steps": position.step,
            "epochs": round(position.epoch + position.batch_in_epoch / num_batches, 4),
            "precision": precision, "skipped_steps": position.skipped_steps, "stopped_by": stopped_by,
            "seconds": round(time.monotonic() - started, 2), "mlflow_run_id": tracker.run_id,
            **val_metrics}
