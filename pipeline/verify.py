"""Check a shard directory against its manifest: checksums, counts, and every sample decodes."""

from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.manifest import read_manifest, sha256_of
from pipeline.shards import decode_sample, iter_tar_samples


def verify_directory(directory: str | Path) -> list[str]:
    """Every problem found, one line each naming the shard (and key); empty when all is well."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for split, shards in manifest.splits.items():
        for shard in shards:
            path = directory / shard.name
            if not path.is_file():
                problems.append(f"{shard.name}: missing")
                continue
            digest = sha256_of(path)
            if digest != shard.sha256:
                problems.append(f"{shard.name}: sha256 {digest[:12]}… != manifest {shard.sha256[:12]}…")
            count = 0
            try:
                with open(path, "rb") as handle:
                    for sample in iter_tar_samples(handle, str(path)):
                        try:
                            decode_sample(sample, manifest.image_shape)
                        except ValueError as error:
                            problems.append(f"{shard.name}: {error}")
                        count += 1
            except (tarfile.TarError, OSError, EOFError) as error:
                problems.append(f"{shard.name}: unreadable tar after {count} samples: {error}")
                continue
            if count != shard.num_samples:
                problems.append(f"{shard.name}: {count} samples, manifest says {shard.num_samples}")
    return problems
