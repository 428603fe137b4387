"""Foreign WebDataset loader throughput vs what the trainer consumes for a 64x64 RGB model, one run.

Shards: real 64x64 RGB patches of scikit-image's photographs (`--source skimage-patches`), written
by `webdataset.TarWriter` as `KEY.jpg` (quality 95) + `KEY.cls`, indexed with `pipeline index`.
Rows: the trainer's consumption (64x64x3 default model, one process), then pipeline.loader on
those shards from local disk and from a local S3-compatible server (moto_server on 127.0.0.1,
through s3fs), with 0, 1 and 2 workers, read epoch after epoch as the trainer reads them; and
the approximate-epoch mode (no manifest, shards resampled) from disk.

    flock /tmp/vae-bench.lock .venv/bin/python bench/foreign_loader.py
    .venv/bin/python bench/foreign_loader.py --samples 512 --train-steps 3   # smoke check
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import write_result  # noqa: E402
from bench.loader import shard_set_rate, trainer_rate  # noqa: E402
from pipeline.data import open_train_val  # noqa: E402
from pipeline.index import index_shards  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import load_source  # noqa: E402

SHAPE = (64, 64, 3)


def write_jpeg_shards(folder: Path, images: np.ndarray, labels: np.ndarray, per_shard: int) -> None:
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, len(images), per_shard)):
        with wds.TarWriter(str(folder / f"{number:06d}.tar")) as writer:
            for index in range(start, min(start + per_shard, len(images))):
                buffer = io.BytesIO()
                Image.fromarray(images[index]).save(buffer, format="JPEG", quality=95)
                writer.write({"__key__": f"s{index:07d}", "jpg": buffer.getvalue(), "cls": str(int(labels[index]))})


def loader_rate(location: str, batch_size: int, num_workers: int, num_samples: int,
                samples_per_epoch: int = 0) -> float:
    train, _ = open_train_val(location, image_shape=SHAPE, samples_per_epoch=samples_per_epoch, announce=False)
    return shard_set_rate(train, batch_size, num_workers, num_samples)


class LocalS3:
    """moto_server on a free 127.0.0.1 port, its endpoint in the environment (as s3fs reads it)."""

    def __enter__(self) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = Path(sys.executable).parent / "moto_server"
        self.process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                return endpoint
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=8_000, help="samples read per loader row")
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "foreign_loader.json"))
    args = parser.parse_args()

    source = load_source("skimage-patches")
    images, labels = source.read(), source.labels
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalS3():
        import boto3

        local = Path(tmp) / "jpg"
        write_jpeg_shards(local, images, labels, args.per_shard)
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        for path in sorted(local.iterdir()):
            client.upload_file(str(path), "bench", f"jpg/{path.name}")
        index_shards(str(local), progress=False)
        index_shards("s3://bench/jpg/", progress=False)
        batch = torch.from_numpy(np.ascontiguousarray(images[: 8 * args.batch_size].transpose(0, 3, 1, 2)))

        from train.config import build_config

        rate, precision = trainer_rate(batch, args.batch_size, args.train_steps,
                                       config=build_config({"model": {"image_size": 64, "channels": 3}}))
        rows.append({"reader": f"trainer consumes (64x64x3 default model, {precision}, 1 process)",
                     "workers": "-", "samples_per_s": rate})
        consumed = rate  # the fastest consumer: the ratio's denominator
        preset_rate, _ = trainer_rate(batch, args.batch_size, max(3, args.train_steps // 3),
                                      config=build_config({"model": {"preset": "resnet-s", "image_size": 64,
                                                                     "channels": 3}}))
        rows.append({"reader": f"trainer consumes (64x64x3 resnet-s preset, {precision}, 1 process)",
                     "workers": "-", "samples_per_s": preset_rate})
        for name, location in (("local disk", str(local)), ("local S3 server", "s3://bench/jpg")):
            for workers in (0, 1, 2):
                rows.append({"reader": f"pipeline.loader, TarWriter jpg shards, indexed, {name}", "workers": workers,
                             "samples_per_s": loader_rate(location, args.batch_size, workers, args.samples)})
        # the recommended fix where decoding limits: one `pipeline shards` pass into the block layout
        block = Path(tmp) / "block"
        write_shards(source, block, samples_per_shard=args.per_shard, layout="block", progress=False)
        for workers in (0, 1, 2):
            rows.append({"reader": "pipeline.loader, the same images in our block layout, local disk",
                         "workers": workers, "samples_per_s": loader_rate(str(block), args.batch_size, workers,
                                                                          args.samples)})
        rows.append({"reader": "pipeline.loader, TarWriter jpg shards, no manifest (resampled), local disk",
                     "workers": 1, "samples_per_s": loader_rate(f"{local}/{{000000..{len(list(local.glob('*.tar'))) - 1:06d}}}.tar",
                                                                args.batch_size, 1, args.samples,
                                                                samples_per_epoch=len(images) // 2)})
    for row in rows:
        row["ratio_to_trainer"] = row["samples_per_s"] / consumed
    print(f"{'reader':<80} {'workers':>7} {'samples/s':>10} {'x trainer':>9}")
    for row in rows:
        print(f"{row['reader']:<80} {row['workers']!s:>7} {row['samples_per_s']:>10.0f} {row['ratio_to_trainer']:>9.2f}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, no GPU",
              "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "num_images": int(len(images)), "command": "flock /tmp/vae-bench.lock .venv/bin/python bench/foreign_loader.py",
              "rows": rows}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
