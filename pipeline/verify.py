"""Check a shard directory against its manifest: checksums, counts, and every sample decodes."""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

from pipeline.manifest import read_manifest, sha256_of
from pipeline.shards import decode_samples, iter_tar_samples


def _layout_of(sample: dict) -> str:
    if "images.npy" in sample:
        return "block"
    return next((ext for ext in ("png", "jpg", "webp", "npy") if ext in sample), "?")


def verify_directory(directory: str | Path) -> list[str]:
    """Every problem found, one line each naming the shard (and key); empty when all is well."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    listed = {shard.name for shards in manifest.splits.values() for shard in shards}
    for stray in sorted(p.name for p in directory.glob("*.tar") if p.name not in listed):
        problems.append(f"{stray}: not in the manifest")
    for split, shards in manifest.splits.items():
        for shard in shards:
            path = directory / shard.name
            if not path.is_file():
                problems.append(f"{shard.name}: missing")
                continue
            size = path.stat().st_size
            if size != shard.num_bytes:
                problems.append(f"{shard.name}: {size} bytes, manifest says {shard.num_bytes}")
            digest = sha256_of(path)
            if digest != shard.sha256:
                problems.append(f"{shard.name}: sha256 {digest[:12]}… != manifest {shard.sha256[:12]}…")
            count = 0
            keys: set[str] = set()
            try:
                with open(path, "rb") as handle:
                    for sample in iter_tar_samples(handle, str(path)):
                        key = sample["__key__"]
                        if key in keys:
                            problems.append(f"{shard.name}: key {key} appears twice")
                        keys.add(key)
                        if _layout_of(sample) != manifest.layout:
                            problems.append(f"{shard.name}: key {key} is a {_layout_of(sample)!r} "
                                            f"sample, manifest layout is {manifest.layout!r}")
                        try:
                            images, labels = decode_samples(sample, manifest.image_shape)
                            count += len(images)
                            if (labels < 0).any() and manifest.num_classes:
                                problems.append(f"{shard.name}: key {key}: missing label")
                        except ValueError as error:
                            problems.append(f"{shard.name}: {error}")
                            count += 1
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                problems.append(f"{shard.name}: unreadable tar after {count} samples: {error}")
                continue
            if count != shard.num_samples:
                problems.append(f"{shard.name}: {count} samples, manifest says {shard.num_samples}")
    return problems
