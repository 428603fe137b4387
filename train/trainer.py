"""The training loop: build, resume, loop over steps, evaluate/log/save at intervals."""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.images import make_grid
from pipeline.loader import batches_per_epoch, make_train_loader, open_split
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.config import TrainConfig, config_to_dict
from train.distributed import DistContext, all_reduce_sum
from train.evaluate import evaluate, sample_grid_images
from train.loss import vae_loss
from train.model import ConvVAE, build_model
from train.precision import autocast, resolve_precision
from train.tracking import make_tracker

MAX_CONSECUTIVE_SKIPS = 20


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then cosine decay to 5% of the peak at max_steps."""
    warmup, total = config.optim.warmup_steps, config.run.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def check_data_matches_model(config: TrainConfig, image_shape: tuple[int, int, int]) -> None:
    expected = (config.model.image_size, config.model.image_size, config.model.channels)
    if tuple(image_shape) != expected:
        raise ValueError(
            f"shards hold {image_shape[0]}x{image_shape[1]}x{image_shape[2]} images but the model "
            f"expects {expected[0]}x{expected[1]}x{expected[2]}: set --model.image_size and "
            "--model.channels to match the manifest")


def train_step(model, optimizer, scheduler, images: torch.Tensor, config: TrainConfig,
               precision: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (per-batch [nelbo, recon, kl] sums, grad norm) as tensors, no sync."""
    x = images.to(device, non_blocking=True).float().div_(255.0)  # uint8 crossed the bus
    with autocast(precision, device):
        logits, posterior = model(x)
    terms = vae_loss(logits, x, posterior)
    loss = terms.negative_elbo(config.optim.beta).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    sums = torch.stack([(terms.recon + terms.kl).sum(), terms.recon.sum(), terms.kl.sum()]).detach()
    return sums, grad_norm


def run_training(config: TrainConfig, context: DistContext) -> dict:
    """Train until max_steps or max_time_s; returns a summary dict (printed by every rank)."""
    torch.manual_seed(config.run.seed)
    precision = resolve_precision(config.run.precision, context.device)
    train_shards = open_split(config.data.shards, "train")
    val_shards = open_split(config.data.shards, "val")
    check_data_matches_model(config, train_shards.manifest.image_shape)

    model: ConvVAE = build_model(config.model).to(context.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    checkpoint_dir = Path(config.run.out_dir) / "checkpoints"
    step, epoch, run_id = 0, 0, None
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=context.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, run_id = state["step"], state["epoch"] + 1, state.get("mlflow_run_id")
        if context.is_main:
            print(f"resumed from {resume_from} at step {step}", file=sys.stderr)

    wrapped = DistributedDataParallel(model) if context.is_distributed else model
    tags = {"world_size": str(context.world_size), "backend": context.backend,
            "precision": precision, "device": str(context.device), "torch": torch.__version__}
    tracker = make_tracker(config, context.is_main, tags, run_id)
    num_batches = batches_per_epoch(train_shards.num_samples, config.data.batch_size, context.world_size)
    loader = make_train_loader(train_shards, batch_size=config.data.batch_size, rank=context.rank,
                               world_size=context.world_size, seed=config.run.seed,
                               num_workers=config.data.num_workers)
    fixed_batch = next(iter_first(val_shards, config, context))

    def save(current_step: int, current_epoch: int) -> Path | None:
        if not context.is_main:
            return None
        return save_checkpoint(checkpoint_dir, current_step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": current_epoch,
            "config": config_to_dict(config), "mlflow_run_id": tracker.run_id,
            "torch_rng": torch.get_rng_state(),
        }, keep=config.run.keep_checkpoints)

    def evaluate_and_log(current_step: int) -> dict[str, float]:
        metrics = evaluate(model, val_shards, context, batch_size=config.data.batch_size,
                           precision=precision)
        tracker.log_metrics(metrics, current_step)
        if context.is_main:
            x = fixed_batch.to(context.device).float().div_(255.0)
            samples, pairs = sample_grid_images(model, x, num_samples=64, seed=config.run.seed)
            tracker.log_image(make_grid(samples, 8), "samples", current_step)
            tracker.log_image(make_grid(pairs, 8), "reconstructions", current_step)
            print(f"step {current_step}: val neg-ELBO {metrics['val/neg_elbo']:.2f} nats", file=sys.stderr)
        return metrics

    started = time.monotonic()
    window = torch.zeros(3, dtype=torch.float64, device=context.device)
    window_images, window_start, consecutive_skips, skipped = 0, time.monotonic(), 0, 0
    val_metrics: dict[str, float] = {}
    status = "FAILED"
    try:
        stop = step >= config.run.max_steps
        while not stop:
            loader.dataset.epoch = epoch
            for images, _ in itertools.islice(loader, num_batches):
                sums, grad_norm = train_step(wrapped, optimizer, scheduler, images, config,
                                             precision, context.device)
                # One host sync per step: grads are all-reduced, so every rank makes the same call.
                if not torch.isfinite(grad_norm):
                    skipped += 1
                    consecutive_skips += 1
                    optimizer.zero_grad(set_to_none=True)
                    if consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                        raise FloatingPointError(
                            f"non-finite gradients for {consecutive_skips} steps in a row, last at step {step}")
                    continue
                consecutive_skips = 0
                optimizer.step()
                scheduler.step()
                step += 1
                window += sums.double()
                window_images += images.shape[0]
                if step % config.run.log_interval_steps == 0 or step == config.run.max_steps:
                    totals = all_reduce_sum(torch.cat([window, window.new_tensor([window_images])]), context)
                    elapsed = time.monotonic() - window_start
                    nelbo, recon, kl = (totals[:3] / totals[3]).tolist()
                    tracker.log_metrics({"train/neg_elbo": nelbo, "train/recon": recon, "train/kl": kl,
                                         "train/lr": scheduler.get_last_lr()[0],
                                         "train/grad_norm": float(grad_norm),
                                         "train/samples_per_s": totals[3].item() / elapsed,
                                         "train/skipped_steps": skipped}, step)
                    window.zero_()
                    window_images, window_start = 0, time.monotonic()
                    out_of_time = config.run.max_time_s > 0 and time.monotonic() - started > config.run.max_time_s
                    # Rank 0's clock decides, so all ranks stop at the same step.
                    flag = torch.tensor([float(out_of_time and context.is_main)], device=context.device)
                    if all_reduce_sum(flag, context).item() > 0:
                        stop = True
                if step >= config.run.max_steps:
                    stop = True
                if step % config.run.eval_interval_steps == 0 and not stop:
                    val_metrics = evaluate_and_log(step)
                if step % config.run.checkpoint_interval_steps == 0 and not stop:
                    save(step, epoch)
                if stop:
                    break
            epoch += 1
        val_metrics = evaluate_and_log(step)
        final = save(step, epoch - 1 if epoch else 0)
        if final is not None:
            tracker.log_artifacts(final, "checkpoint")
        status = "FINISHED"
    finally:
        tracker.close(status)
    return {"rank": context.rank, "world_size": context.world_size, "steps": step,
            "epochs": epoch, "precision": precision, "skipped_steps": skipped,
            "seconds": round(time.monotonic() - started, 2), "mlflow_run_id": tracker.run_id,
            **val_metrics}


def iter_first(val_shards, config: TrainConfig, context: DistContext):
    """The first validation batch on rank 0, for reconstruction grids (64 images at most)."""
    from pipeline.loader import iter_eval_batches

    for images, _, mask in iter_eval_batches(val_shards, batch_size=min(64, config.data.batch_size),
                                             rank=0, world_size=1):
        yield images[mask]
        return
