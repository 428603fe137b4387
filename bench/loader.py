"""Loader throughput vs what the trainer consumes, measured side by side in one run.

Rows: the trainer's consumption (one process, default model and batch, the precision `auto`
picks), a plain in-memory TensorDataset DataLoader, and pipeline.loader over the same 4,500
real training digits written as PNG, raw .npy and block shards, with 0, 1 and 2 workers.
Loaders are read the way the trainer reads them: epoch after epoch (`dataset.epoch = e`, then
`islice(loader, batches_per_epoch)`), so worker start-up and epoch turns are included.

    flock /tmp/vae-bench.lock .venv/bin/python bench/loader.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.loader import batches_per_epoch, make_train_loader, open_split  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import load_mnist5k  # noqa: E402


def trainer_rate(images: torch.Tensor, batch_size: int, num_steps: int, config=None) -> tuple[float, str]:
    """Samples/s one training process consumes with the default model (or `config`'s) and batch size.

    Written against train's public model API (encode -> sample -> decode, kl) so it does not
    break when the trainer's internals move: forward, Bernoulli NLL + KL, backward, AdamW step.
    """
    from train.config import build_config
    from train.model import build_model
    from train.precision import autocast, resolve_precision

    config = config or build_config({})
    device = torch.device("cpu")
    precision = resolve_precision(config.run.precision, device)
    model = build_model(config.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    generator = torch.Generator().manual_seed(0)
    batches = [images[i : i + batch_size] for i in range(0, len(images) - batch_size, batch_size)]

    def step(x_uint8: torch.Tensor) -> None:
        x = x_uint8.float().div_(255.0)
        with autocast(precision, device):
            posterior = model.encode(x)
            params = model.decode(posterior.sample(generator))
        recon = torch.nn.functional.binary_cross_entropy_with_logits(
            params.float(), x, reduction="none").flatten(1).sum(1)
        loss = (recon + posterior.kl().float()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    for x in batches[:5]:  # warm-up
        step(x)
    started = time.perf_counter()
    for x in itertools.islice(itertools.cycle(batches), num_steps):
        step(x)
    return num_steps * batch_size / (time.perf_counter() - started), precision


def tensor_dataset_rate(images: torch.Tensor, labels: torch.Tensor, batch_size: int, num_samples: int) -> float:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=batch_size, shuffle=True, drop_last=True)
    seen, started = 0, time.perf_counter()
    while seen < num_samples:
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - started)


def loader_rate(directory: Path, batch_size: int, num_workers: int, num_samples: int,
                persistent: bool = True) -> float:
    return shard_set_rate(open_split(str(directory), "train"), batch_size, num_workers, num_samples, persistent)


def shard_set_rate(shards, batch_size: int, num_workers: int, num_samples: int, persistent: bool = True) -> float:
    """Samples/s the training loader yields from a ShardSet, epochs repeated until num_samples are seen."""
    per_epoch = batches_per_epoch(shards.num_samples, batch_size, 1)
    started = time.perf_counter()
    loader = make_train_loader(shards, batch_size=batch_size, rank=0, world_size=1, seed=0,
                               num_workers=num_workers, persistent_workers=persistent)
    seen = 0
    for epoch in itertools.count():
        loader.dataset.epoch = epoch
        for x, _ in itertools.islice(loader, per_epoch):
            seen += len(x)
        if seen >= num_samples:
            break
    rate = seen / (time.perf_counter() - started)
    del loader
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=40_000, help="samples read per loader row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = parser.parse_args()

    source = load_mnist5k()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {}
        for layout in ("png", "npy", "block"):
            layouts[layout] = Path(tmp) / layout
            write_shards(source, layouts[layout], samples_per_shard=250, layout=layout, progress=False)
        train = open_split(str(layouts["block"]), "train")
        from pipeline.shards import read_shard_images

        parts = [read_shard_images(u, train.manifest.image_shape) for u in train.urls]
        images = torch.from_numpy(__import__("numpy").concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(__import__("numpy").concatenate([p[1] for p in parts]))

        # On a busy 2-core machine one torch thread can beat two (threads spin while waiting for
        # cores): measure both and hold the loader to the faster trainer, the harder target.
        default_threads = torch.get_num_threads()
        trainer_rows = []
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            rate, precision = trainer_rate(images, args.batch_size, args.train_steps)
            trainer_rows.append({"reader": f"trainer consumes (default model, {precision}, 1 process, "
                                           f"{threads} torch thread{'s' * (threads > 1)})",
                                 "workers": "-", "samples_per_s": rate})
        torch.set_num_threads(default_threads)
        consumed = max(row["samples_per_s"] for row in trainer_rows)
        rows += trainer_rows
        rows.append({"reader": "in-memory TensorDataset DataLoader", "workers": 0,
                     "samples_per_s": tensor_dataset_rate(images, labels, args.batch_size, args.samples)})
        for layout in ("png", "npy", "block"):
            for workers in (0, 1, 2):
                samples = args.samples if layout == "block" else args.samples // 4
                rows.append({"reader": f"pipeline.loader, {layout} shards", "workers": workers,
                             "samples_per_s": loader_rate(layouts[layout], args.batch_size, workers, samples)})
        rows.append({"reader": "pipeline.loader, block shards, workers restarted every epoch",
                     "workers": 1, "samples_per_s": loader_rate(layouts["block"], args.batch_size, 1,
                                                                args.samples, persistent=False)})
    for row in rows:
        row["ratio_to_trainer"] = row["samples_per_s"] / consumed
    print(f"{'reader':<64} {'workers':>7} {'samples/s':>10} {'x trainer':>9}")
    for row in rows:
        print(f"{row['reader']:<64} {row['workers']!s:>7} {row['samples_per_s']:>10.0f} "
              f"{row['ratio_to_trainer']:>9.2f}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "command": "flock /tmp/vae-bench.lock .venv/bin/python bench/loader.py",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {os.getloadavg()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
