"""Bad data: skipped, counted and warned about, within an error budget; past it, an error.

One `DataErrors` per loader. Its counters live in shared memory, so the counts made in
DataLoader worker processes are visible to the training process (read them to log a metric).
"""

from __future__ import annotations

import multiprocessing
import warnings
from dataclasses import dataclass


class DataError(RuntimeError):
    """Too much bad data: the message names the shard that went over the budget."""


class DataWarning(UserWarning):
    """A skipped sample or shard; the message names the shard and the key."""


@dataclass(frozen=True)
class ErrorBudget:
    """How much bad data a loader skips before it stops.

    Skipping goes on while the skipped samples are at most `max_bad_samples`, or at most
    `max_bad_fraction` of the samples read so far, whichever allows more.
    """

    max_bad_samples: int = 100
    """Bad samples skipped without question (per rank; 0 stops at the first)."""
    max_bad_fraction: float = 0.001
    """Beyond that, the share of samples read that may be bad."""

    def __post_init__(self) -> None:
        if self.max_bad_samples < 0 or not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"error budget needs max_bad_samples >= 0 and max_bad_fraction in "
                             f"[0, 1], got {self.max_bad_samples}, {self.max_bad_fraction}")

    def allows(self, num_bad: int, num_read: int) -> bool:
        return num_bad <= max(self.max_bad_samples, self.max_bad_fraction * num_read)


class DataErrors:
    """Counters shared by a loader's worker processes, and the budget they are held to.

    Read `num_skipped_samples`, `num_bad_shards`, `num_read_samples`, or `metrics()` for a dict
    ready to log (e.g. to MLflow) from the training process.
    """

    def __init__(self, budget: ErrorBudget | None = None) -> None:
        self.budget = budget or ErrorBudget()
        # Shared memory: DataLoader workers inherit these at start and write to the same memory.
        self._skipped = multiprocessing.Value("q", 0)
        self._bad_shards = multiprocessing.Value("q", 0)
        self._read = multiprocessing.Value("q", 0)

    @property
    def num_skipped_samples(self) -> int:
        return int(self._skipped.value)

    @property
    def num_bad_shards(self) -> int:
        return int(self._bad_shards.value)

    @property
    def num_read_samples(self) -> int:
        return int(self._read.value)

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {f"{prefix}skipped_samples": float(self.num_skipped_samples),
                f"{prefix}bad_shards": float(self.num_bad_shards),
                f"{prefix}read_samples": float(self.num_read_samples)}

    def count_read(self, num: int) -> None:
        with self._read.get_lock():
            self._read.value += num

    def skip(self, url: str, key: str | None, num_samples: int, reason: str, *,
             bad_shard: bool = False) -> None:
        """Count `num_samples` skipped in shard `url` (at `key`), warn, and stop if over budget."""
        with self._skipped.get_lock():
            self._skipped.value += num_samples
            skipped = self._skipped.value
        if bad_shard:
            with self._bad_shards.get_lock():
                self._bad_shards.value += 1
        where = f"{url}" + (f" key {key}" if key else "")
        if not self.budget.allows(skipped, self.num_read_samples):
            raise DataError(
                f"{where}: {reason}; {skipped} bad samples skipped so far, over the error budget "
                f"({self.budget.max_bad_samples} samples or {self.budget.max_bad_fraction:.2%} of "
                f"{self.num_read_samples} read)")
        warnings.warn(f"{where}: skipped {num_samples} sample{'s' * (num_samples != 1)}: {reason} "
                      f"({skipped} skipped so far)", DataWarning, stacklevel=3)
