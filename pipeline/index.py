"""`python -m pipeline index`: scan a foreign WebDataset once and write the manifest the loader needs.

With per-shard sample counts a foreign set gets what our own shards have: equal full batches on
every rank, real epochs (each sample once), exact resume at (epoch, batch), and `verify`. The scan
reads every shard once (in parallel, with a progress bar) and looks at each sample's image
*header* only (size and mode, no pixel decoding), so it costs about one read of the data.

The manifest (layout "wds") lists train and val shards by name beside it; `extra.index` records
the image and label members found, the image sizes and modes seen, the label set and the bad
samples met (named). `verify` scans again and decodes every image as training would.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import __version__
from pipeline.foreign import SampleDecoder, find_image_key, iter_shard_samples, label_value
from pipeline.images import DEFAULT_MAX_PIXELS, decode_npy
from pipeline.manifest import FOREIGN_LAYOUT, MANIFEST_NAME, SHARD_SUFFIXES, Manifest, ShardInfo
from pipeline.stores import is_store_url, list_store, write_store
from pipeline.urls import (DEFAULT_RETRY, RetryPolicy, ShardOpenError, expand_urls, is_remote, is_shard_spec,
                           open_url, shard_name)

MAX_PROBLEMS_KEPT = 20
"""Problems named per shard in the manifest (all are counted)."""
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class _Hashing(io.RawIOBase):
    """A read-through stream that counts and (optionally) hashes the bytes read from it."""

    def __init__(self, stream, digest) -> None:
        self.stream, self.digest, self.num_bytes = stream, digest, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.num_bytes += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass
class ShardScan:
    """What one shard holds, as found by reading it once."""

    url: str
    num_samples: int = 0
    num_bytes: int = 0
    sha256: str = ""
    image_keys: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)  # "HxWxC"
    modes: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)  # int or str
    num_problems: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.num_problems += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(text)


def _probe_image(sample: dict, member: str, max_pixels: int) -> tuple[tuple[int, int, int], str]:
    """((height, width, channels), mode) from an image's header, without decoding its pixels."""
    data = sample[member]
    if member == "npy":
        array = decode_npy(data)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
            raise ValueError(f"expected an HxW or HxWx(1|3) uint8 array, got {array.dtype} {array.shape}")
        channels = 1 if array.ndim == 2 else array.shape[2]
        return (array.shape[0], array.shape[1], channels), f"npy:{array.dtype}"
    try:
        pil = Image.open(io.BytesIO(data))
    except Exception as error:  # Pillow raises many types for bad bytes; name it once
        raise ValueError(f"undecodable image ({len(data)} bytes): {error}") from None
    width, height = pil.size
    if width * height > max_pixels:
        raise ValueError(f"image declares {width}x{height} pixels, more than the {max_pixels:,} allowed")
    return (height, width, 1 if pil.mode in _GREY_MODES else 3), pil.mode


def scan_shard(url: str, *, image_key: str = "auto", label_key: str = "auto", sha256: bool = True,
               decoder: SampleDecoder | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               retry: RetryPolicy = DEFAULT_RETRY) -> ShardScan:
    """Count, hash and describe one shard; each bad sample is a named problem, not an exception.

    With `decoder`, every sample is also decoded exactly as training decodes it (for `verify`).
    A shard that cannot be opened raises ShardOpenError.
    """
    scan = ShardScan(url)
    digest = hashlib.sha256() if sha256 else None
    with open_url(url, retry) as raw:
        stream = _Hashing(raw, digest)
        try:
            for sample in iter_shard_samples(stream, url):
                scan.num_samples += 1
                key = sample["__key__"]
                try:
                    member = find_image_key(sample, image_key)
                    shape, mode = _probe_image(sample, member, max_pixels)
                    scan.image_keys[member] += 1
                    scan.shapes["x".join(map(str, shape))] += 1
                    scan.modes[mode] += 1
                    label = label_value(sample, label_key)
                    if label is not None:
                        scan.labels[label] += 1
                    if decoder is not None:
                        decoder(sample)
                except ValueError as error:
                    message = str(error)
                    named = message if f"sample {key}:" in message else f"sample {key}: {message}"
                    scan.problem(f"{shard_name(url)}: {named}")
            while stream.read(1 << 20):  # the rest (end-of-archive padding) belongs in the checksum
                pass
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            if isinstance(error, ShardOpenError):
                raise
            scan.problem(f"{shard_name(url)}: unreadable tar after {scan.num_samples} samples: {error}")
    scan.num_bytes = stream.num_bytes
    scan.sha256 = digest.hexdigest() if digest is not None else ""
    return scan


def _scan_job(job: tuple) -> ShardScan:
    url, options = job
    return scan_shard(url, **options)


def scan_shards(urls: list[str], *, workers: int = 1, progress: bool = True, desc: str = "indexing",
                **options) -> list[ShardScan]:
    """scan_shard over many shards in `workers` processes, in order, with a progress bar."""
    bar = tqdm(total=len(urls), desc=desc, unit="shard", disable=not progress, file=sys.stderr)
    scans: list[ShardScan] = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        jobs = [(url, options) for url in urls]
        for scan in (pool.map(_scan_job, jobs) if pool else map(_scan_job, jobs)):
            scans.append(scan)
            bar.update(1)
            bar.set_postfix(samples=sum(s.num_samples for s in scans), problems=sum(s.num_problems for s in scans))
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return scans


def list_shards(location: str) -> list[str]:
    """Shard URLs of a brace pattern, a `::` list, a local folder or an object-store prefix."""
    if is_shard_spec(location):
        return expand_urls(location)
    if is_store_url(location):
        urls = list_store(location, SHARD_SUFFIXES)
    elif is_remote(location):
        raise ValueError(f"{location!r}: cannot list an http(s) folder; name the shards with a brace "
                         "pattern such as 'https://host/data/{000000..000099}.tar'")
    else:
        folder = Path(location.removeprefix("file://"))
        urls = sorted(str(p) for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIXES)) if folder.is_dir() else []
    if not urls:
        raise ValueError(f"{location!r}: no *.tar, *.tar.gz or *.tgz shards there")
    return urls


def _folder(url: str) -> str:
    return url.rpartition("/")[0] if "/" in url else "."


def _labels_summary(labels: Counter) -> tuple[int, tuple[str, ...], list]:
    """(num_classes, class_names, [[label, count], ...]) of the labels seen."""
    if not labels:
        return 0, (), []
    names = sorted(str(v) for v in labels if isinstance(v, str))
    numbers = [v for v in labels if isinstance(v, int)]
    if names and numbers:
        raise ValueError(f"labels mix integers ({sorted(numbers)[:5]}) and names ({names[:5]}); "
                         "pick a label key that holds one kind")
    counts = sorted(([str(k) if names else int(k), n] for k, n in labels.items()), key=lambda kv: kv[0])
    if names:
        return len(names), tuple(names), counts
    return max(numbers) + 1, (), counts


def build_manifest(spec: str, train: list[ShardScan], val: list[ShardScan], *, image_key: str,
                   label_key: str, base: str | None) -> Manifest:
    """The manifest of an indexed foreign set (layout "wds")."""
    everything = train + val
    shapes = sum((s.shapes for s in everything), Counter())
    if not shapes:
        raise ValueError(f"{spec!r}: no readable image in any shard "
                         f"({sum(s.num_problems for s in everything)} problems, e.g. "
                         f"{next((p for s in everything for p in s.problems), 'none')})")
    common = tuple(int(d) for d in shapes.most_common(1)[0][0].split("x"))
    image_keys = sum((s.image_keys for s in everything), Counter())
    num_classes, class_names, label_counts = _labels_summary(sum((s.labels for s in everything), Counter()))
    if label_key == "auto":  # record what "auto" found, so training reads the same member
        label_key = "cls" if label_counts else "none"
    index = {
        "spec": spec,
        "image_key": image_key if image_key != "auto" else image_keys.most_common(1)[0][0],
        "label_key": label_key,
        "image_sizes": dict(shapes.most_common()),
        "image_modes": dict(sum((s.modes for s in everything), Counter()).most_common()),
        "labels": label_counts,
        "num_problems": sum(s.num_problems for s in everything),
        "problems": [p for s in everything for p in s.problems][:MAX_PROBLEMS_KEPT * 5],
    }
    if base is not None:
        index["base"] = base

    def infos(scans: list[ShardScan]) -> list[ShardInfo]:
        return [ShardInfo(shard_name(s.url), s.num_samples, s.num_bytes, s.sha256) for s in scans]

    return Manifest(source=f"index:{spec}", seed=0, image_shape=common,
                    splits={"train": infos(train), "val": infos(val)}, pixel_mean=0.0, pixel_std=0.0,
                    num_classes=num_classes, tool_version=__version__, layout=FOREIGN_LAYOUT,
                    class_names=class_names, extra={"index": index})


def index_shards(spec: str, *, out: str | None = None, val: str | None = None, val_shards: int = 1,
                 workers: int = 1, image_key: str = "auto", label_key: str = "auto", sha256: bool = True,
                 progress: bool = True, retry: RetryPolicy = DEFAULT_RETRY) -> tuple[Manifest, str]:
    """Scan a foreign shard set and write its manifest; returns (manifest, where it was written).

    Validation shards are `val` (a pattern beside the training shards) or the last `val_shards`
    of `spec`. The manifest goes to `out`, by default manifest.json beside the shards (written
    through fsspec for an object store).
    """
    urls = list_shards(spec)
    if val:
        val_urls = list_shards(val)
        held_out = set(val_urls)
        train_urls = [u for u in urls if u not in held_out]
    else:
        if not 1 <= val_shards < len(urls):
            raise ValueError(f"{spec!r} names {len(urls)} shard(s); --val-shards {val_shards} must leave at "
                             "least one for training and take at least one for validation (or pass --val)")
        train_urls, val_urls = urls[:-val_shards], urls[-val_shards:]
    folders = {_folder(u) for u in train_urls + val_urls}
    if len(folders) != 1 or any(u.startswith("pipe:") for u in urls):
        raise ValueError(f"the shards must sit in one folder (found {sorted(folders)[:3]}) and not be pipe: "
                         "commands: the manifest names them relative to that folder")
    folder = folders.pop()
    names = [shard_name(u) for u in train_urls + val_urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names repeat in {spec!r}: {sorted(n for n in names if names.count(n) > 1)[:3]}")
    options = dict(image_key=image_key, label_key=label_key, sha256=sha256, retry=retry)
    scans = scan_shards(train_urls + val_urls, workers=workers, progress=progress, **options)
    out = out or f"{folder}/{MANIFEST_NAME}"
    base = None if _folder(out) == folder else folder
    if base is not None and not is_remote(base) and not Path(base).is_absolute():
        base = str(Path(base).resolve())
    manifest = build_manifest(spec, scans[: len(train_urls)], scans[len(train_urls):], image_key=image_key,
                              label_key=label_key, base=base)
    if is_store_url(out):
        write_store(out, manifest.to_json().encode("utf-8"))
    elif is_remote(out):
        raise ValueError(f"cannot write a manifest to {out}; pass --out with a local path or an s3:// / gs:// URL")
    else:
        path = Path(out)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(manifest.to_json())
        temporary.replace(path)
    return manifest, out


def verify_foreign(location: str, retry: RetryPolicy = DEFAULT_RETRY, workers: int = 1,
                   progress: bool = False) -> list[str]:
    """Every problem in an indexed foreign set, one line each naming the shard (and key):
    missing shards, counts, sizes and checksums against the manifest, and every image decoded."""
    from pipeline.urls import resolve_split

    problems: list[str] = []
    for split in ("train", "val"):
        urls, counts, manifest = resolve_split(location, split, retry)
        index = manifest.extra.get("index", {})
        height, width, channels = manifest.image_shape
        side = min(height, width)
        decoder = SampleDecoder((side, side, channels), index.get("image_key", "auto"),
                                index.get("label_key", "auto"), tuple(manifest.class_names))
        infos = manifest.shards(split)
        for url, info in zip(urls, infos):
            try:
                scan = scan_shard(url, image_key=decoder.image_key, label_key=decoder.label_key,
                                  sha256=bool(info.sha256), decoder=decoder, retry=retry)
            except ShardOpenError as error:
                problems.append(f"{info.name}: missing ({error})")
                continue
            problems += scan.problems[: scan.num_problems]
            if scan.num_problems > len(scan.problems):
                problems.append(f"{info.name}: {scan.num_problems - len(scan.problems)} more problems")
            if scan.num_samples != info.num_samples:
                problems.append(f"{info.name}: {scan.num_samples} samples, manifest says {info.num_samples}")
            if scan.num_bytes != info.num_bytes:
                problems.append(f"{info.name}: {scan.num_bytes} bytes, manifest says {info.num_bytes}")
            if info.sha256 and scan.sha256 != info.sha256:
                problems.append(f"{info.name}: sha256 {scan.sha256[:12]}… != manifest {info.sha256[:12]}…")
    return problems
