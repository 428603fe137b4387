"""When a run stops: its step, epoch and time limits, SIGTERM (preemption) and a dead torchrun
agent, decided once per step and agreed on by every rank."""

from __future__ import annotations

import logging
import math
import signal
import time

import torch

from pipeline.cli import EXIT_PREEMPTED  # 128 + SIGTERM, what Kubernetes and torchrun expect
from train.config import TrainConfig
from train.distributed import DistContext, all_reduce_sum
from train.state import Position

log = logging.getLogger(__name__)


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
        log.warning("%s: saving a checkpoint at the end of this step, then exiting", reason)

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


class StopConditions:
    """The run's limits. `check` is the one collective of every step: SIGTERM on any rank and rank 0's
    clock are summed, so every rank stops at the same step for the same reason."""

    def __init__(self, config: TrainConfig, context: DistContext, num_batches: int, position: Position) -> None:
        self.config, self.context, self.num_batches = config, context, num_batches
        limits = [config.run.max_steps] if config.run.max_steps else []
        if config.run.max_epochs:
            limits.append(math.ceil(config.run.max_epochs * num_batches))
        self.step_limit = min(limits) if limits else None  # None: the schedule follows the clock
        self.started = time.monotonic() - position.elapsed_s  # the time limit counts over restarts

    def progress(self, position: Position) -> float:
        """How far the schedule is, 0 -> 1: by steps, or by rank 0's clock without a step limit."""
        if self.step_limit:
            return position.step / self.step_limit
        return position.elapsed_s / self.config.run.max_time_s

    def steps_reached(self, position: Position) -> bool:
        run = self.config.run
        return (bool(run.max_steps) and position.step >= run.max_steps) or (
            bool(run.max_epochs) and position.epochs(self.num_batches) >= run.max_epochs)

    def check(self, position: Position, preempted: PreemptionFlag) -> str:
        """'sigterm', 'time', 'steps' or '' (go on); sets position.elapsed_s to rank 0's clock."""
        context = self.context
        if not preempted.set and context.agent_gone():  # torchrun was SIGKILLed: stop as for SIGTERM
            preempted.request(f"the torchrun agent (pid {context.agent_pid}) is gone")
        flags = torch.tensor([float(preempted.set), self.elapsed_s() if context.is_main else 0.0])
        if context.is_distributed:
            flags = all_reduce_sum(flags.to(context.device), context).cpu()
        position.elapsed_s = float(flags[1])
        if flags[0] > 0:
            return "sigterm"
        if self.config.run.max_time_s and position.elapsed_s >= self.config.run.max_time_s:
            return "time"
        return "steps" if self.steps_reached(position) else ""

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def eta_s(self, position: Position, steps_per_s: float) -> float | None:
        """Seconds to the nearest limit at `steps_per_s` (None when no limit can be estimated)."""
        left = []
        if self.step_limit and steps_per_s > 0:
            left.append(max(0, self.step_limit - position.step) / steps_per_s)
        if self.config.run.max_time_s:
            left.append(max(0.0, self.config.run.max_time_s - position.elapsed_s))
        return min(left) if left else None
