"""The training-metric window: per-step sums kept on the device, all-reduced and logged every
`log_interval_steps`, and the rank-0 progress line printed with them."""

from __future__ import annotations

import contextlib
import time

import torch

from pipeline.errors import DataErrors
from train.distributed import DistContext, all_reduce_sum
from train.tracking import system_metrics


class MetricWindow:
    """Sums of [neg-ELBO, recon, KL] over the images of the finite steps since the last log.

    `log` is a collective: it runs when `should_run` says so, which depends only on the step and the
    shared stop decision, so every rank reduces at the same step. Only the tracker checks the rank.
    """

    def __init__(self, context: DistContext, tracker, *, interval_steps: int, data_errors: DataErrors,
                 with_system_metrics: bool) -> None:
        self.context, self.tracker, self.interval_steps = context, tracker, interval_steps
        self.data_errors, self.with_system_metrics = data_errors, with_system_metrics
        self.sums = torch.zeros(3, dtype=torch.float64, device=context.device)
        self.num_images, self.wait_s, self.started = 0, 0.0, time.perf_counter()

    def add(self, sums: torch.Tensor, num_images: int) -> None:
        """One finite step's batch sums (no host sync)."""
        self.sums += sums.double()
        self.num_images += num_images

    @contextlib.contextmanager
    def timing_wait(self):
        """Time inside is waiting for the loader (reported as train/data_wait_share)."""
        wait_start = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s += time.perf_counter() - wait_start

    @contextlib.contextmanager
    def paused(self):
        """Time inside (checkpoints, evaluation) does not count against samples/s."""
        pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - pause_start

    def should_run(self, step: int, stopping: bool) -> bool:
        return self.num_images > 0 and (step % self.interval_steps == 0 or stopping)

    def log(self, step: int, instant: dict[str, float]) -> dict[str, float]:
        """All-reduce the window (every rank), log it with `instant` values (rank 0 sends), start a new one."""
        errors = self.data_errors  # this start's counts, every rank's summed
        totals = all_reduce_sum(torch.cat([self.sums, self.sums.new_tensor(
            [self.num_images, self.wait_s, errors.num_skipped_samples, errors.num_bad_shards,
             errors.num_read_samples])]), self.context)
        elapsed = time.perf_counter() - self.started
        nelbo, recon, kl = (totals[:3] / totals[3]).tolist()
        metrics = {"train/neg_elbo": nelbo, "train/recon": recon, "train/kl": kl, **instant,
                   "train/samples_per_s": totals[3].item() / elapsed,
                   "train/data_wait_share": totals[4].item() / self.context.world_size / elapsed,
                   "data/skipped_samples": totals[5].item(), "data/bad_shards": totals[6].item(),
                   "data/read_samples": totals[7].item()}
        if self.with_system_metrics and self.context.is_main:
            metrics.update(system_metrics(self.context.device))
        self.tracker.log_metrics(metrics, step)
        self.sums.zero_()
        self.num_images, self.wait_s, self.started = 0, 0.0, time.perf_counter()
        return metrics


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_line(step: int, metrics: dict[str, float], *, step_limit: int | None, eta_s: float | None) -> str:
    """`step 120/2000 | neg-ELBO 145.32 nats | 3,840 samples/s | ETA 0:02:13`, for rank 0's log."""
    steps = f"step {step}/{step_limit}" if step_limit else f"step {step}"
    eta = f" | ETA {_duration(eta_s)}" if eta_s is not None else ""
    return (f"{steps} | neg-ELBO {metrics['train/neg_elbo']:.2f} nats | "
            f"{metrics['train/samples_per_s']:,.0f} samples/s{eta}")
