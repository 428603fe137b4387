"""Process-group setup from torchrun's environment, and a teardown that exits cleanly."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Computed once and passed down: who this process is and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    agent_pid: int | None = None
    """The torchrun agent that started this process (None without torchrun): see agent_gone."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def agent_gone(self) -> bool:
        """True when the torchrun agent that started this process has died (SIGKILL, OOM kill)."""
        return self.agent_pid is not None and os.getppid() != self.agent_pid


def torchrun_agent_pid() -> int | None:
    """The pid of the torchrun agent that started this process, or None without torchrun.

    torchrun starts each worker in a session of its own, so a SIGKILL of the agent alone leaves the
    workers training on, unsupervised: the trainer polls `agent_gone()` at every step. (Not
    PR_SET_PDEATHSIG: the kernel sends it again each time the orphan passes to another of the dying
    agent's threads, so workers got two SIGTERMs in 2 of 3 tries and the second cut the save short.)
    """
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None  # set by torchrun's agent


def setup_distributed() -> DistContext:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun sets them); NCCL on GPU, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    agent_pid = torchrun_agent_pid()
    if world_size > 1:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device, backend, agent_pid)


def teardown_distributed(context: DistContext) -> None:
    """Destroy the process group so the process exits cleanly.

    With gloo about 1 exit in 4 aborts ("terminate called without an active exception") unless
    the model and optimizer are already unreferenced, garbage is collected and the group is
    destroyed before a short pause; callers drop their references before calling this.
    """
    gc.collect()
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(0.2)


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum over ranks (a no-op on one process); every rank must call it."""
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
