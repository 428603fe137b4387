"""manifest.json: what a shard directory holds, with a sha256 per shard."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import MISSING as _MISSING, asdict, dataclass, field, fields
from pathlib import Path

from pipeline.images import DEFAULT_MAX_PIXELS

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 (before layouts) is read as layout "png"
LAYOUTS = ("png", "npy", "block", "jpg", "webp")
FOREIGN_LAYOUT = "wds"
"""A foreign WebDataset indexed by `pipeline index`: any tool's members, decoded by pipeline.foreign."""
MAX_MANIFEST_BYTES = 64 << 20
"""Largest manifest.json read (about 300,000 shards); more is refused before parsing."""
MAX_COUNT = 2**48
"""Largest sample or byte count a manifest may state (shared-memory counters are int64)."""

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,200}(?:%s)"
                        % "|".join(map(re.escape, SHARD_SUFFIXES)))
"""A shard's name in a manifest: a plain file name, nothing a path or a shell could read more into
(no '/', no '..', no spaces or shell metacharacters, no leading '-'), ending in .tar/.tar.gz/.tgz.
Names are pasted into shard URLs and `pipe:` commands (pipeline.urls.sibling), so this is what
keeps a manifest from choosing a file outside its directory or a command to run."""


def check_shard_name(name: object) -> str:
    """`name` if it is a plain shard file name (SHARD_NAME), else a ValueError that shows it."""
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise ValueError(f"{_show(name)} is not a plain shard file name (letters, digits, '.', '_', '-', "
                         "starting with a letter or digit, no '..', ending in .tar, .tar.gz or .tgz)")
    return name


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
    def from_dict(cls, data: object, origin: str = "manifest") -> "Manifest":
        """The one validating reader: every field's type and range checked, every problem reported
        at once in a ValueError naming `origin` (the file or URL the manifest came from)."""
        problems = _problems_in(data)
        if problems:
            raise ValueError(f"{origin}: malformed manifest: {len(problems)} problem{'s' * (len(problems) > 1)}: "
                             + "; ".join(problems))
        splits = {split: [ShardInfo(**shard) for shard in shards] for split, shards in data["splits"].items()}
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


_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_FIELDS = {"name", "num_samples", "num_bytes", "sha256"}


def _show(value: object) -> str:
    """A value for an error message: repr, cut short (names come from untrusted files)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object, low: int = 0, high: int = MAX_COUNT) -> bool:
    return type(value) is int and low <= value <= high  # bool is an int subclass: refused


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _problems_in(data: object) -> list[str]:
    """Everything wrong with a parsed manifest.json, one short line each (empty when it is good)."""
    if not isinstance(data, dict):
        return [f"expected a JSON object at the top level, got {type(data).__name__}"]
    problems = []

    def expect(name: str, ok: bool, expected: str) -> None:
        if not ok:
            problems.append(f"{name}: expected {expected}, got {_show(data[name])}")

    known = {f.name for f in fields(Manifest)}
    required = {f.name for f in fields(Manifest) if f.default is _MISSING and f.default_factory is _MISSING}
    problems += [f"{name}: missing" for name in sorted(required - data.keys())]
    problems += [f"{_show(name)}: unknown field" for name in sorted(data.keys() - known)]
    if "format_version" in data:
        expect("format_version", type(data["format_version"]) is int and data["format_version"] in READABLE_VERSIONS,
               f"one of {READABLE_VERSIONS} (this tool's readable versions)")
    else:
        problems.append(f"format_version: missing (this tool reads {READABLE_VERSIONS})")
    for name in ("source", "tool_version"):
        if name in data:
            expect(name, isinstance(data[name], str), "a string")
    for name in ("seed", "num_classes", "samples_per_block"):
        if name in data:
            expect(name, _is_int(data[name]), f"an integer in [0, {MAX_COUNT}]")
    for name in ("pixel_mean", "pixel_std"):
        if name in data:
            expect(name, _is_number(data[name]) and (name == "pixel_mean" or data[name] >= 0),
                   "a finite number" + (" >= 0" if name == "pixel_std" else ""))
    if "layout" in data:
        expect("layout", data["layout"] in LAYOUTS + (FOREIGN_LAYOUT,), f"one of {LAYOUTS + (FOREIGN_LAYOUT,)}")
    if "extra" in data:
        extra = data["extra"]
        expect("extra", isinstance(extra, dict), "a JSON object")
        if isinstance(extra, dict) and "class_counts" in extra:  # the one key in it that is read (inspect)
            counts = extra["class_counts"]
            if not (isinstance(counts, dict) and all(isinstance(c, list) and all(_is_int(n) for n in c)
                                                     for c in counts.values())):
                problems.append(f"extra.class_counts: expected a JSON object of split -> list of counts, "
                                f"got {_show(counts)}")
        if isinstance(extra, dict) and "index" in extra:  # what `pipeline index` found (read to decode)
            problems += _index_problems(extra["index"])
    if "class_names" in data:
        expect("class_names", isinstance(data["class_names"], list)
               and all(isinstance(n, str) for n in data["class_names"]), "a list of strings")
    channels = None
    if "image_shape" in data:
        shape = data["image_shape"]
        good = (isinstance(shape, list) and len(shape) == 3 and all(_is_int(d, 1) for d in shape)
                and shape[2] in (1, 3) and shape[0] * shape[1] <= DEFAULT_MAX_PIXELS)
        expect("image_shape", good, f"[height, width, channels] with channels 1 or 3 and at most "
                                    f"{DEFAULT_MAX_PIXELS:,} pixels")
        channels = shape[2] if good else None
    for name in ("channel_mean", "channel_std"):
        if name in data:
            values = data[name]
            expect(name, isinstance(values, list) and all(_is_number(v) for v in values)
                   and len(values) in (0, channels or len(values)), "a list of finite numbers, one per channel")
    if "splits" in data:
        # `pipeline index --no-sha256` records no checksum (""): verify then checks counts and decoding
        problems += _split_problems(data["splits"], allow_no_sha256=data.get("layout") == FOREIGN_LAYOUT)
    return problems


def _index_problems(index: object) -> list[str]:
    """What is wrong with extra.index (pipeline index's findings) in the fields readers use."""
    from pipeline.foreign import check_image_key, check_label_key

    if not isinstance(index, dict):
        return [f"extra.index: expected a JSON object, got {_show(index)}"]
    problems = []
    for name, check in (("image_key", check_image_key), ("label_key", check_label_key)):
        if name in index:
            try:
                if not isinstance(index[name], str):
                    raise ValueError(f"expected a string, got {_show(index[name])}")
                check(index[name])
            except ValueError as error:
                problems.append(f"extra.index.{name}: {error}")
    if "base" in index and not isinstance(index["base"], str):  # which folders: pipeline.urls decides
        problems.append(f"extra.index.base: expected a string, got {_show(index['base'])}")
    for name in ("image_sizes", "image_modes"):
        if name in index and not (isinstance(index[name], dict) and all(_is_int(n) for n in index[name].values())):
            problems.append(f"extra.index.{name}: expected a JSON object of counts, got {_show(index[name])}")
    if "num_problems" in index and not _is_int(index["num_problems"]):
        problems.append(f"extra.index.num_problems: expected a count, got {_show(index['num_problems'])}")
    if "problems" in index and not (isinstance(index["problems"], list) and all(isinstance(p, str) for p in index["problems"])):
        problems.append(f"extra.index.problems: expected a list of strings, got {_show(index['problems'])}")
    return problems


def _split_problems(splits: object, allow_no_sha256: bool = False) -> list[str]:
    if not isinstance(splits, dict):
        return [f"splits: expected a JSON object of split name -> list of shards, got {_show(splits)}"]
    problems, seen = [], set()
    for split, shards in splits.items():
        split = _show(split)
        if not isinstance(shards, list):
            problems.append(f"splits[{split}]: expected a list of shards, got {_show(shards)}")
            continue
        for index, shard in enumerate(shards):
            where = f"splits[{split}][{index}]"
            if not isinstance(shard, dict) or shard.keys() != _SHARD_FIELDS:
                got = _show(shard)
                if isinstance(shard, dict):
                    got = (f"missing {sorted(_SHARD_FIELDS - shard.keys())}, "
                           f"unknown {_show(sorted(shard.keys() - _SHARD_FIELDS))}")
                problems.append(f"{where}: expected an object of exactly {sorted(_SHARD_FIELDS)}, got {got}")
                continue
            try:
                name = check_shard_name(shard["name"])
            except ValueError as error:
                problems.append(f"{where}.name: {error}")
            else:
                if name in seen:
                    problems.append(f"{where}.name: {name!r} is listed twice")
                seen.add(name)
            for count in ("num_samples", "num_bytes"):
                if not _is_int(shard[count]):
                    problems.append(f"{where}.{count}: expected an integer in [0, {MAX_COUNT}], "
                                    f"got {_show(shard[count])}")
            if not (isinstance(shard["sha256"], str) and (_SHA256.fullmatch(shard["sha256"])
                                                          or (allow_no_sha256 and shard["sha256"] == ""))):
                problems.append(f"{where}.sha256: expected 64 lowercase hex digits, got {_show(shard['sha256'])}")
    return problems


def parse_manifest(text: bytes | str, origin: str) -> Manifest:
    """manifest.json's bytes to a Manifest; every problem (JSON or field) in one ValueError naming `origin`."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{origin}: malformed manifest: more than {MAX_MANIFEST_BYTES:,} bytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, or nested too deep
        raise ValueError(f"{origin}: malformed manifest: not JSON: {str(error)[:200]}") from None
    return Manifest.from_dict(data, origin)


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
    with open(path, "rb") as handle:
        return parse_manifest(handle.read(MAX_MANIFEST_BYTES + 1), str(path))


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write DIR/manifest.json atomically (temporary file, then rename)."""
    path = Path(directory) / MANIFEST_NAME
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(manifest.to_json())
    temporary.replace(path)
    return path
