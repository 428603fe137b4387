"""The trainer's state as one object: model, EMA, optimizer, scaler, noise generator and data
position, saved and restored with `state_dict()` / `load_state_dict()` (the checkpoint format)."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import load_latest
from train.config import TrainConfig
from train.distributed import DistContext
from train.model import VAE, build_model
from train.precision import make_grad_scaler

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where the job is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0

    def epochs(self, num_batches: int) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.batch_in_epoch / num_batches

    def roll_epoch(self, num_batches: int) -> None:
        """After an epoch's last batch, point at the next epoch's first."""
        if self.batch_in_epoch == num_batches:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def update_ema(ema: VAE, model: VAE, step: int, decay: float) -> None:
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


class TrainState:
    """What a checkpoint restores. Built from the config in a fixed order (the seeded weights depend on it)."""

    def __init__(self, config: TrainConfig, context: DistContext, precision: str, num_batches: int) -> None:
        self.config, self.context, self.num_batches = config, context, num_batches
        self.model: VAE = build_model(config.model).to(context.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if config.optim.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                           weight_decay=config.optim.weight_decay)
        self.scaler = make_grad_scaler(precision, context.device)
        self.generator = torch.Generator(device=context.device).manual_seed(
            config.run.seed * 7919 + 1 + context.rank)
        self.position = Position()
        self.consecutive_skips = 0

    @property
    def eval_model(self) -> VAE:
        """What evaluation, sampling and export use: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def apply_gradients(self, grad_norm: torch.Tensor) -> bool:
        """Step the optimizer (and EMA) when the gradients are finite; otherwise skip and count.

        One host sync per step. DDP all-reduced the gradients, so every rank decides alike.
        Too many skips in a row stop the run with an error naming the step.
        """
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                update_ema(self.ema, self.model, self.position.step, self.config.optim.ema_decay)
            self.position.step += 1
            self.consecutive_skips = 0
            return True
        self.scaler.update()  # fp16: lowers the scale; otherwise a no-op
        self.optimizer.zero_grad(set_to_none=True)
        self.position.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.config.run.max_consecutive_skips:
            position = self.position
            raise FloatingPointError(
                f"non-finite loss or gradients for {self.consecutive_skips} steps in a row, the last at step "
                f"{position.step} (epoch {position.epoch}, batch {position.batch_in_epoch}); lower optim.lr "
                "or check the data")
        return False

    def state_dict(self) -> dict:
        """The checkpoint's trainer part. A collective (it gathers every rank's noise generator):
        every rank calls it at the same step."""
        rng = {"torch": torch.get_rng_state(), "generators": gather_rng_states(self.generator, self.context)}
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "position": asdict(self.position), "epoch": self.position.epoch, "rng": rng,
                "world_size": self.context.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint (format 1 or 2). On the same world size the run continues exactly;
        on another, data order and noise continue approximately (said once, by rank 0)."""
        context = self.context
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema") or state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler") or {})
        saved = state.get("position") or {"step": state["step"], "epoch": state.get("epoch", -1) + 1}
        self.position = Position(**saved)
        saved_world = state.get("world_size", context.world_size)
        if saved_world != context.world_size:  # batches per epoch changed: keep the share of the epoch
            self.position.batch_in_epoch = min(self.num_batches - 1,
                                               self.position.batch_in_epoch * saved_world // context.world_size)
            if context.is_main:
                log.warning("resuming %d ranks' checkpoint on %d: data order and noise continue approximately, "
                            "not exactly", saved_world, context.world_size)
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if len(rng.get("generators", [])) == context.world_size:  # same world size: exact continuation
            self.generator.set_state(rng["generators"][context.rank].cpu())


def resume(state: TrainState, checkpoint_dir: Path, context: DistContext) -> dict:
    """Load the newest readable checkpoint in `checkpoint_dir` into `state` and return it ({} when there
    is none). A collective: every rank must continue from the same step, or all raise."""
    loaded = load_latest(checkpoint_dir, map_location=context.device)  # unreadable ones: warned, passed over
    saved: dict = {}
    if loaded is not None:
        path, saved = loaded
        state.load_state_dict(saved)
        if context.is_main:
            log.info("resumed from %s at step %d", path, state.position.step)
    if context.is_distributed:
        step = state.position.step
        bounds = torch.tensor([step, -step], dtype=torch.float64, device=context.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        if bounds[0] != -bounds[1]:
            raise ValueError(f"ranks found different newest checkpoints in {checkpoint_dir} (steps "
                             f"{-bounds[1]:.0f} to {bounds[0]:.0f}); is it on a filesystem every rank sees alike?")
    return saved
