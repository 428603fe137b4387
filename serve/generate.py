"""Many samples to disk: decoding overlaps with PNG encoding and writing on CPU worker threads.

The main thread decodes batch after batch; each decoded batch goes to a pool of writer threads
(Pillow's PNG encoder, numpy and file writes release the GIL). At most `2 * workers` batches are in
flight, so memory stays bounded however many samples are asked for.
Formats: `npy` (one (N, H, W, C) uint8 file, written through a memmap), `png` (one file per
sample, 10,000 per folder) and `wds` (WebDataset tar shards plus manifest.json in the pipeline's
layouts, readable by `pipeline.loader.open_split(DIR, "train")` and so by `train`). `wds` picks
the layout as `pipeline shards` does ("auto": blocks of raw pixels for small images, PNG for large
ones): one PNG per member costs more CPU than decoding on this kind of machine (BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.images import encode_png, nchw_to_nhwc, save_grid, to_uint8
from pipeline.manifest import Manifest, ShardInfo, sha256_of, write_manifest
from pipeline.shards import DEFAULT_SAMPLES_PER_BLOCK, check_layout, resolve_layout, write_tar
from serve.runtime import VAERuntime

FORMATS = ("npy", "png", "wds")
PNG_PER_FOLDER = 10_000


@dataclass(frozen=True)
class GenerateReport:
    num_samples: int
    seconds: float
    decode_seconds: float
    out: Path
    provider: str

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else float("inf")


class _NpyWriter:
    def __init__(self, out: Path, num: int, shape: tuple[int, int, int]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "samples.npy"
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8, shape=(num, *shape))

    def write(self, start: int, images: np.ndarray) -> None:
        self.array[start:start + len(images)] = images

    def close(self) -> None:
        self.array.flush()
        del self.array


class _PngWriter:
    def __init__(self, out: Path, num: int, shape: tuple[int, int, int]) -> None:
        self.out = out
        for folder in range(-(-num // PNG_PER_FOLDER)):
            (out / f"{folder:05d}").mkdir(parents=True, exist_ok=True)

    def write(self, start: int, images: np.ndarray) -> None:
        for offset, image in enumerate(images):
            index = start + offset
            # compress_level=1: lossless like the default, several times faster on small images
            (self.out / f"{index // PNG_PER_FOLDER:05d}" / f"{index:09d}.png").write_bytes(
                encode_png(image, compress_level=1))

    def close(self) -> None:
        pass


class _ShardWriter:
    """WebDataset shards of `samples_per_shard` in a pipeline layout (no labels), plus manifest.json."""

    def __init__(self, out: Path, num: int, shape: tuple[int, int, int], samples_per_shard: int,
                 source: str, seed: int, layout: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.shape, self.source, self.seed = out, shape, source, seed
        self.samples_per_shard = samples_per_shard
        self.layout = resolve_layout(layout, shape)
        self.infos: dict[int, ShardInfo] = {}

    def write(self, start: int, images: np.ndarray) -> None:
        # `generate` hands over whole shards (the last may be short), so one call writes one tar file
        number = start // self.samples_per_shard
        path = self.out / f"train-{number:06d}.tar"
        temporary = path.with_suffix(".tar.tmp")
        keys = [f"sample-{start + offset:09d}" for offset in range(len(images))]
        with open(temporary, "wb") as handle:
            write_tar(handle, keys, images, None, layout=self.layout, samples_per_block=DEFAULT_SAMPLES_PER_BLOCK,
                      block_prefix=f"train-{number:06d}")
        temporary.replace(path)
        self.infos[number] = ShardInfo(path.name, len(images), path.stat().st_size, sha256_of(path))

    def close(self) -> None:
        from pipeline import __version__

        write_manifest(self.out, Manifest(
            source=self.source, seed=self.seed, image_shape=self.shape,
            splits={"train": [self.infos[k] for k in sorted(self.infos)]},
            pixel_mean=0.0, pixel_std=0.0, num_classes=0, tool_version=__version__, layout=self.layout,
            samples_per_block=DEFAULT_SAMPLES_PER_BLOCK if self.layout == "block" else 0,
            extra={"generated": True, "labels": "none"}))


def _convert_and_write(writer, start: int, images: np.ndarray) -> None:
    writer.write(start, to_uint8(nchw_to_nhwc(images)))


def generate(runtime: VAERuntime, num: int, out: str | Path, *, fmt: str = "npy", batch_size: int = 0,
             seed: int = 0, temperature: float = 1.0, workers: int = 2, samples_per_shard: int = 10_000,
             layout: str = "auto", grid: str | Path | None = None, progress: bool = True) -> GenerateReport:
    """Decode `num` samples in batches and write them as `fmt` under `out` while the next batch decodes.

    The latents are one seeded stream, so the same seed gives the same samples whatever the batch size.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if num < 1:
        raise ValueError(f"number of samples must be >= 1, got {num}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    batch_size = batch_size or runtime.batch_size
    channels, height, width = runtime.image_shape
    shape = (height, width, channels)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    check_layout(layout)
    # npy/png write each decoded batch; wds writes whole shards, so batches are gathered to shard size
    unit = samples_per_shard if fmt == "wds" else batch_size
    if fmt == "wds":
        writer = _ShardWriter(out, num, shape, samples_per_shard, f"generated:{runtime.model_dir}", seed, layout)
    else:
        writer = {"npy": _NpyWriter, "png": _PngWriter}[fmt](out, num, shape)
    rng = np.random.default_rng(seed)
    in_flight: deque[Future] = deque()
    buffered: list[np.ndarray] = []
    buffered_start = 0
    grid_images: list[np.ndarray] = []
    decode_seconds = 0.0
    started = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="writer") as pool, \
            tqdm(total=num, unit="img", desc=f"generate {fmt}", disable=not progress) as bar:
        for start in range(0, num, batch_size):
            rows = min(batch_size, num - start)
            decode_started = time.perf_counter()
            z = rng.standard_normal((rows, runtime.latent_dim), dtype=np.float32) * np.float32(temperature)
            # the image output alone (sampling needs no likelihood parameters), checked finite and in [0, 1]
            (images,) = runtime.decoder.run(z, ["image"], batch_size)  # float (B, C, H, W); workers make uint8
            decode_seconds += time.perf_counter() - decode_started
            if grid is not None:  # the contact sheet holds the first 64 samples, whatever the batch size
                grid_images.append(to_uint8(nchw_to_nhwc(images[:64 - sum(map(len, grid_images))])))
                if sum(map(len, grid_images)) >= min(64, num):
                    save_grid(np.concatenate(grid_images), grid, num_cols=8)
                    grid = None
            buffered.append(images)
            done = start + rows
            while sum(len(b) for b in buffered) >= unit or (done == num and buffered):
                pending = np.concatenate(buffered) if len(buffered) > 1 else buffered[0]
                chunk, rest = pending[:unit], pending[unit:]
                buffered = [rest] if len(rest) else []
                while len(in_flight) >= 2 * workers:  # backpressure: bounded memory
                    in_flight.popleft().result()
                future = pool.submit(_convert_and_write, writer, buffered_start, chunk)
                future.add_done_callback(lambda f, n=len(chunk): bar.update(n))
                in_flight.append(future)
                buffered_start += len(chunk)
        for future in in_flight:
            future.result()  # re-raises a writer's error
    writer.close()
    return GenerateReport(num, time.perf_counter() - started, decode_seconds, out, runtime.provider)
