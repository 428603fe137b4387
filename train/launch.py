"""`python -m train.launch [torchrun flags] -m train [trainer flags]`: torchrun, exiting 143 on SIGTERM.

torchrun answers SIGTERM by stopping its workers (each trainer saves a checkpoint and exits 143)
and then raising, so the process a supervisor watches exits 1 and a preemption reads as a crash.
This runs torchrun's own `main`, flags unchanged, and turns the signal that stopped it into
128 + its number (143 for SIGTERM, 130 for SIGINT), the status of any process stopped by a
signal. Every other outcome, a failed worker included, is torchrun's own.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    sys.argv[0] = "python -m train.launch"  # the name torchrun's --help shows
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except SignalException as stop:
        status = 128 + int(stop.sigval)
        print(f"torchrun: {stop.sigval.name} received, workers stopped; exiting {status}",
              file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
