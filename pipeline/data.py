"""Which shards train and validate, and how their samples become images: the trainer's one entry point.

Three kinds of shard set, told apart by what sits beside them and by `samples_per_epoch`:
- our own shards (`pipeline shards`, manifest layout png/npy/block): read as they are;
- a foreign set indexed by `pipeline index` (manifest layout "wds"): exact epochs from the
  manifest's counts, samples decoded and fitted to the model by pipeline.foreign;
- a foreign set with no manifest (`samples_per_epoch` > 0): the approximate-epoch mode, shards
  drawn with replacement, an epoch being `samples_per_epoch` samples.
"""

from __future__ import annotations

import dataclasses
import sys

from pipeline import __version__
from pipeline.foreign import SampleDecoder, check_image_key, check_label_key
from pipeline.loader import ShardSet, open_split
from pipeline.manifest import FOREIGN_LAYOUT, Manifest, ShardInfo
from pipeline.urls import DEFAULT_RETRY, RetryPolicy, shard_name


def _decoder(manifest: Manifest, image_shape: tuple[int, int, int], image_key: str,
             label_key: str) -> SampleDecoder:
    """Flags win over what the index recorded; "auto" takes the index's choice."""
    index = manifest.extra.get("index", {})
    return SampleDecoder(
        tuple(image_shape),
        image_key if image_key != "auto" else index.get("image_key", "auto"),
        label_key if label_key != "auto" else index.get("label_key", "auto"),
        tuple(manifest.class_names))


def _foreign(shards: ShardSet, decoder: SampleDecoder) -> ShardSet:
    # The images come out at the model's shape, so that is the shape this set holds for readers.
    manifest = dataclasses.replace(shards.manifest, image_shape=decoder.image_shape)
    return ShardSet(shards.urls, shards.counts, manifest, decoder, shards.samples_per_epoch)


def _unindexed_manifest(location: str, image_shape: tuple[int, int, int], train: list[str],
                        val: list[str], val_counts: list[int]) -> Manifest:
    return Manifest(
        source=f"wds:{location}", seed=0, image_shape=tuple(image_shape),
        splits={"train": [ShardInfo(shard_name(u), 0, 0, "") for u in train],
                "val": [ShardInfo(shard_name(u), n, 0, "") for u, n in zip(val, val_counts)]},
        pixel_mean=0.0, pixel_std=0.0, num_classes=0, tool_version=__version__, layout=FOREIGN_LAYOUT)


def open_train_val(location: str, *, image_shape: tuple[int, int, int], image_key: str = "auto",
                   label_key: str = "auto", samples_per_epoch: int = 0, val_location: str = "",
                   retry: RetryPolicy = DEFAULT_RETRY, announce: bool = True) -> tuple[ShardSet, ShardSet]:
    """(train, val) shard sets for a model taking `image_shape` (H, W, C) images.

    `samples_per_epoch` > 0 selects the approximate-epoch mode (no manifest needed); then
    validation reads `val_location`'s shards, or, without it, the last shard of `location`
    (held out of training). `announce` prints that choice (rank 0 passes True).
    """
    check_image_key(image_key)
    check_label_key(label_key)
    if samples_per_epoch < 0:
        raise ValueError(f"samples_per_epoch must be >= 0, got {samples_per_epoch}")
    if not samples_per_epoch:
        train = open_split(location, "train", retry)
        val = open_split(val_location or location, "val", retry)
        if train.manifest.layout != FOREIGN_LAYOUT:
            if (image_key, label_key) != ("auto", "auto"):
                raise ValueError(f"{location}: image_key/label_key apply to foreign shard sets; these shards "
                                 f"were written by `pipeline shards` (layout {train.manifest.layout})")
            return train, val
        decoder = _decoder(train.manifest, image_shape, image_key, label_key)
        return _foreign(train, decoder), _foreign(val, decoder)

    from pipeline.index import list_shards, scan_shards

    urls = list_shards(location)
    if val_location:
        val_urls = list_shards(val_location)
    elif len(urls) < 2:
        raise ValueError(f"{location!r} names one shard: pass validation shards with data.val_shards")
    else:
        urls, val_urls = urls[:-1], urls[-1:]
        if announce:
            print(f"approximate epochs of {samples_per_epoch} samples from {len(urls)} shards; "
                  f"validating on {val_urls[0]} (held out; set data.val_shards to choose)",
                  file=sys.stderr, flush=True)
    decoder = SampleDecoder(tuple(image_shape), image_key, label_key)
    # Validation reads every sample once, so its counts are needed: one quick scan of its shards.
    val_counts = [scan.num_samples for scan in scan_shards(
        val_urls, progress=False, image_key=image_key, label_key=label_key, sha256=False, retry=retry)]
    manifest = _unindexed_manifest(location, image_shape, urls, val_urls, val_counts)
    train = ShardSet(urls, [], manifest, decoder, samples_per_epoch)
    val = ShardSet(val_urls, val_counts, manifest, decoder)
    return train, val
