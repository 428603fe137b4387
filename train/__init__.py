"""The VAE and its DDP trainer (`torchrun -m train`).

Light on purpose: `import train.model` pulls in torch only, never MLflow or torch.distributed.

    model = train.load_model("out/run")        # the trained VAE (EMA weights), eval mode
    state = train.load_checkpoint("out/run")   # the whole training state: config, step, optimizer, ...
"""

from __future__ import annotations

from pathlib import Path


def load_model(path: str | Path):
    """The trained VAE in eval mode, from a `save_pretrained` directory (e.g. RUN/model) or any
    checkpoint path (EMA weights when it has them); see train.checkpoint.load_model."""
    from train.checkpoint import load_model as _load_model

    return _load_model(path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's whole state dict (config, step, model/EMA/optimizer weights, data position, ...),
    from a state.pt, a step, checkpoints or run directory; see train.checkpoint.load_checkpoint."""
    from train.checkpoint import load_checkpoint as _load_checkpoint

    return _load_checkpoint(path)
