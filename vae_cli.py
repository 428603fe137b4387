"""`vae STAGE ...`: one console script that dispatches to `python -m STAGE ...`."""

from __future__ import annotations

import runpy
import sys

STAGES = {
    "pipeline": "write, verify and inspect WebDataset shards",
    "train": "train the VAE (use `torchrun ... -m train` for several processes)",
    "export": "export a checkpoint to verified ONNX",
    "serve": "generate, reconstruct and serve from the ONNX files",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print("usage: vae {" + ",".join(STAGES) + "} ...\n")
        for name, text in STAGES.items():
            print(f"  {name:<9} {text}")
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    stage = sys.argv.pop(1)
    sys.argv[0] = f"vae {stage}"
    runpy.run_module(stage, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
