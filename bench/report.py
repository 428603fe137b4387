"""Where every bench script's JSON goes: one place that writes it and says so."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_result(out: str | Path, result: dict) -> None:
    """Write `result` as indented JSON to `out` (parents created) and print where, with the load average."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {os.getloadavg()}; wrote {out}")
