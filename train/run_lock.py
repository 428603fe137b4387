"""One writer per run directory: an exclusive lock on OUT_DIR/run.lock, held for the whole run.

A POSIX record lock (fcntl.lockf), not flock: it belongs to the process that took it and is not
inherited by the DataLoader workers it forks, so a trainer killed with SIGKILL frees the
directory at once, even while its orphaned workers wind down (an flock stayed held by them).
The kernel drops it when the holder dies, so no stale lock is ever left behind; a second trainer
on the same directory is refused at once, with the holder's pid and host. Locks are per process:
take it once per process, and keep the one file object open for the whole run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirInUseError(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _describe(holder_text: str) -> str:
    try:
        holder = json.loads(holder_text)
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


class RunDirLock:
    """Holds OUT_DIR/run.lock until `release()` (or the process ends)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                self._file.close()
                raise
            self._file.seek(0)
            holder = _describe(self._file.read())
            self._file.close()
            raise RunDirInUseError(
                f"run directory {self.path.parent} is in use by another trainer ({holder}): two "
                "writers would overwrite each other's checkpoints; wait for it to end, stop it, "
                "or choose another --run.out_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
