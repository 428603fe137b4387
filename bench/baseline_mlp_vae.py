"""The classic baseline: the pytorch/examples VAE (MLP 784-400-20, ReLU, Adam 1e-3, batch 128,
BCE summed over pixels and batch, trained on grey images), written out here as the reference.

It exposes encode/decode/config like train.model.ConvVAE so both are scored by the same
IWAE estimator (train.evaluate.iwae_log_likelihood).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig
from train.likelihood import Bernoulli
from train.model import DiagonalGaussian


class MlpVAE(nn.Module):
    """fc1 784->400, fc21/fc22 400->20, fc3 20->400, fc4 400->784, as in pytorch/examples vae/main.py."""

    def __init__(self, image_pixels: int = 784, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        self.config = ModelConfig(latent_dim=latent, likelihood="bernoulli")
        self.likelihood = Bernoulli()
        self.fc1 = nn.Linear(image_pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, image_pixels)
        self.image_shape = (1, 28, 28)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = F.relu(self.fc1(x.flatten(1)))
        return DiagonalGaussian(self.fc21(h), self.fc22(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, 1, 28, 28); the example applies the sigmoid inside, same model."""
        return self.fc4(F.relu(self.fc3(z))).view(-1, *self.image_shape)

    def forward(self, x: torch.Tensor, generator=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def negative_elbo_sum(model: MlpVAE, x: torch.Tensor, generator=None) -> torch.Tensor:
    """BCE + KLD summed over the batch, the example's loss_function."""
    logits, posterior = model(x, generator)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    return bce + posterior.kl().sum()


@torch.no_grad()
def test_negative_elbo(model: MlpVAE, x_test: torch.Tensor, seed: int = 0) -> float:
    """Mean one-sample negative ELBO per test image (nats), with fixed noise."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    value = sum(negative_elbo_sum(model, x_test[i:i + 500], generator).item()
                for i in range(0, len(x_test), 500)) / len(x_test)
    model.train()
    return value


def train_baseline(x_train: torch.Tensor, x_test: torch.Tensor, budget_s: float, *, seed: int = 1,
                   batch_size: int = 128, lr: float = 1e-3) -> dict:
    """Train for budget_s seconds; evaluate the test neg-ELBO after every epoch; keep the best.

    Returns the best and final models with their epochs and the test neg-ELBO curve.
    """
    torch.manual_seed(seed)
    model = MlpVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best_value, best_state, best_epoch, curve = float("inf"), None, 0, []
    started, epoch, train_seconds = time.monotonic(), 0, 0.0
    while train_seconds < budget_s:
        epoch_start = time.monotonic()
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), batch_size):
            loss = negative_elbo_sum(model, x_train[order[i:i + batch_size]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch += 1
        train_seconds += time.monotonic() - epoch_start  # evaluation is not charged to the budget
        value = test_negative_elbo(model, x_test)
        curve.append((epoch, round(train_seconds, 2), value))
        if value < best_value:
            best_value, best_state, best_epoch = value, copy.deepcopy(model.state_dict()), epoch
    best = MlpVAE()
    best.load_state_dict(best_state)
    return {"final": model.eval(), "best": best.eval(), "best_epoch": best_epoch, "epochs": epoch,
            "best_test_neg_elbo": best_value, "curve": curve,
            "wall_s": round(time.monotonic() - started, 1)}
