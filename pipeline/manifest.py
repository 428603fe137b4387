"""manifest.json: what a shard directory holds, with a sha256 per shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 (before layouts) is read as layout "png"
LAYOUTS = ("png", "npy", "block", "jpg", "webp")
FOREIGN_LAYOUT = "wds"
"""A foreign WebDataset indexed by `pipeline index`: any tool's members, decoded by pipeline.foreign."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar file: its name relative to the manifest, sample count, size and checksum."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know before opening a shard."""

    source: str
    seed: int
    image_shape: tuple[int, int, int]  # (height, width, channels)
    splits: dict[str, list[ShardInfo]]
    pixel_mean: float
    pixel_std: float
    num_classes: int
    tool_version: str
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    layout: str = "png"
    """How samples sit in the tar: "png" / "npy" (one `KEY.png`|`KEY.npy` + `KEY.cls` per image)
    or "block" (`KEY.images.npy` (n,H,W,C) uint8 + `KEY.labels.npy` + `KEY.keys.json` per member)."""
    samples_per_block: int = 0
    """Images per block member (layout "block"), else 0."""
    channel_mean: tuple[float, ...] = ()
    """Per-channel pixel mean over all samples, pixels scaled to [0, 1]."""
    channel_std: tuple[float, ...] = ()
    """Per-channel pixel standard deviation, pixels scaled to [0, 1]."""
    class_names: tuple[str, ...] = ()
    """Label i is class_names[i] (folder names for an image folder), when the source names them."""

    def num_samples(self, split: str) -> int:
        """Total samples in one split."""
        return sum(shard.num_samples for shard in self.shards(split))

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of one split; the error names the splits that exist."""
        if split not in self.splits:
            raise KeyError(f"manifest has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"manifest format_version {version!r}; this tool reads {READABLE_VERSIONS}")
        splits = {
            split: [ShardInfo(**shard) for shard in shards]
            for split, shards in data["splits"].items()
        }
        if data.get("layout", "png") not in LAYOUTS + (FOREIGN_LAYOUT,):
            raise ValueError(f"manifest layout {data['layout']!r}; expected one of {LAYOUTS + (FOREIGN_LAYOUT,)}")
        tuples = {name: tuple(data[name]) for name in ("image_shape", "channel_mean", "channel_std",
                                                       "class_names") if name in data}
        return cls(**{**data, "splits": splits, **tuples})

    def shard_info(self, name: str) -> tuple[str, ShardInfo]:
        """(split, entry) of the shard called `name`; the error names it."""
        for split, shards in self.splits.items():
            for shard in shards:
                if shard.name == name:
                    return split, shard
        raise KeyError(f"shard {name!r} is not in the manifest")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> Manifest:
    """Read DIR/manifest.json; a missing or malformed file gives an error naming the path."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}: write shards with `python -m pipeline shards`")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: malformed manifest: {error}") from error


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write DIR/manifest.json atomically (temporary file, then rename)."""
    path = Path(directory) / MANIFEST_NAME
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(manifest.to_json())
    temporary.replace(path)
    return path
