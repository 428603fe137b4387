"""The pythae peer of bench/fmnist_quality.py: pythae's VAE (PyPI pythae 0.1.2) on our shards for a
wall-clock budget, saving a checkpoint every --checkpoint-every-s seconds of training.

Net: exactly our model's encoder and decoder (train.model.build_model with the config given, Bernoulli
head: one logit per pixel) wrapped in pythae's BaseEncoder/BaseDecoder, so the nets match layer for
layer; pythae's VAE supplies the objective (its `bce` reconstruction loss on the sigmoid of the
decoder, plus the analytic KL), Adam as pythae's trainer uses it. The loop is ours only because
pythae's BaseTrainer has no wall-clock limit: in-memory batches, shuffled every epoch, nothing else.
Run it with the python of scripts/pythae-venv.sh (bench/fmnist_quality.py does):

    .venv-pythae/bin/python bench/pythae_peer.py --shards DIR --out DIR [--budget-s 1800] [--model-json '{...}']

Checkpoints: OUT/checkpoints/step-NNNNNNNN.pt holding {"model_config", "state" (our net's
state dict), "step", "elapsed_s"}; bench/bits_per_dim.py scores them without pythae.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m train` does, before torch loads

import torch  # noqa: E402
from pythae.models import VAE, VAEConfig  # noqa: E402
from pythae.models.base.base_utils import ModelOutput  # noqa: E402
from pythae.models.nn import BaseDecoder, BaseEncoder  # noqa: E402
from pythae.data.datasets import DatasetOutput  # noqa: E402

from bits_per_dim import peer_net, read_split  # noqa: E402


class Encoder(BaseEncoder):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> ModelOutput:
        posterior = self.net.encode(x)
        return ModelOutput(embedding=posterior.mean, log_covariance=posterior.logvar)


class Decoder(BaseDecoder):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> ModelOutput:
        return ModelOutput(reconstruction=torch.sigmoid(self.net.decode(z)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=1800.0)
    parser.add_argument("--checkpoint-every-s", type=float, default=60.0)
    parser.add_argument("--model-json", default="{}", help="our model fields for the matched net (JSON)")
    parser.add_argument("--reconstruction-loss", default="bce", choices=("bce", "mse"))
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam's rate (pythae's trainer default is 1e-4; 1e-3 learns faster in a short budget)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model_fields = json.loads(args.model_json)
    x_train = read_split(args.shards, "train").float().div_(255.0)
    net = peer_net(model_fields)
    config = VAEConfig(input_dim=tuple(x_train.shape[1:]), latent_dim=net.config.latent_dim,
                       reconstruction_loss=args.reconstruction_loss)
    model = VAE(config, encoder=Encoder(net), decoder=Decoder(net)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoints = Path(args.out) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    model_config = {"fields": {**model_fields, "likelihood": "bernoulli"}}

    def save(step: int, elapsed_s: float) -> None:
        torch.save({"model_config": model_config, "state": net.state_dict(), "step": step,
                    "elapsed_s": elapsed_s}, checkpoints / f"step-{step:08d}.pt")

    step, epoch, losses = 0, 0, []
    started = time.monotonic()
    next_save = args.checkpoint_every_s
    elapsed = 0.0
    while elapsed < args.budget_s:
        order = torch.randperm(len(x_train))
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            loss = model(DatasetOutput(data=x_train[order[start:start + args.batch_size]])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            elapsed = time.monotonic() - started
            if elapsed >= next_save:
                save(step, elapsed)
                next_save += args.checkpoint_every_s
            if elapsed >= args.budget_s:
                break
        epoch += 1
    save(step, elapsed)
    summary = {"steps": step, "epochs": round(step * args.batch_size / len(x_train), 3),
               "seconds": round(elapsed, 1), "final_train_loss_mean_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
               "threads": torch.get_num_threads()}
    print(json.dumps(summary), flush=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
