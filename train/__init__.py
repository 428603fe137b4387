"""The VAE and its DDP trainer (`torchrun -m train`).

Light on purpose: `import train.model` pulls in torch only, never MLflow or torch.distributed.
"""

from __future__ import annotations


def load_model(path: str):
    """Load a trained VAE (EMA weights when present) from a checkpoint dir or file; see train.checkpoint."""
    from train.checkpoint import load_model as _load_model

    return _load_model(path)
