"""Dynamic batching: concurrent requests gathered into one device call, with a bounded queue.

A request's rows wait at most `max_queue_delay_ms` for company; a batch never exceeds
`max_batch_size` rows unless one request alone is larger (it then runs alone, chunked by the
runtime). When `max_queue` requests already wait, `submit` raises `QueueFull` at once instead of
letting memory grow: the service answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


class QueueFull(RuntimeError):
    """The batcher's queue holds `max_queue` requests already."""


@dataclass(frozen=True)
class BatchingOptions:
    """How requests are gathered into device batches."""

    max_batch_size: int = 64
    """Most rows in one device call (1 turns batching off)."""
    max_queue_delay_ms: float = 5.0
    """Longest a request waits for others to fill its batch."""
    max_queue: int = 256
    """Most requests waiting per graph; more get 503 + Retry-After."""

    def problems(self) -> list[str]:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            problems.append(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue < 1:
            problems.append(f"max_queue must be >= 1, got {self.max_queue}")
        return problems


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    """Gathers `submit`ted arrays into batches and runs `run_batch` on them in one device thread."""

    def __init__(self, name: str, run_batch: Callable[[np.ndarray], list[np.ndarray]], options: BatchingOptions,
                 executor: ThreadPoolExecutor, *, on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.run_batch = run_batch
        self.options = options
        self.executor = executor
        self.on_batch = on_batch or (lambda rows: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def submit(self, rows: np.ndarray) -> list[np.ndarray]:
        """The outputs of `run_batch` for exactly these rows, computed in some batch."""
        if self._closing:
            raise QueueFull(f"{self.name}: shutting down")
        if len(self._queue) >= self.options.max_queue:
            raise QueueFull(f"{self.name}: {len(self._queue)} requests already waiting")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future, time.monotonic()))
        self.on_depth(len(self._queue))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay_s = self.options.max_queue_delay_ms / 1000.0
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for company until the oldest request's deadline or a full batch.
            deadline = self._queue[0].enqueued + delay_s
            while (sum(len(p.rows) for p in self._queue) < self.options.max_batch_size
                   and (remaining := deadline - time.monotonic()) > 0 and not self._closing):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._queue.popleft()]
            rows = len(batch[0].rows)
            while self._queue and rows + len(self._queue[0].rows) <= self.options.max_batch_size:
                rows += len(self._queue[0].rows)
                batch.append(self._queue.popleft())
            self.on_depth(len(self._queue))
            batch = [p for p in batch if not p.future.cancelled()]  # the client went away
            if not batch:
                continue
            self.on_batch(rows)
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            try:
                outputs = await loop.run_in_executor(self.executor, self.run_batch, inputs)
            except Exception as error:  # every waiter gets the device's error, the loop keeps serving
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            start = 0
            for pending in batch:
                stop = start + len(pending.rows)
                if not pending.future.done():
                    pending.future.set_result([output[start:stop] for output in outputs])
                start = stop
