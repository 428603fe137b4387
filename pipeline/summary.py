"""`python -m pipeline inspect`: what a shard location holds, and a preview grid of samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.images import save_grid
from pipeline.manifest import FOREIGN_LAYOUT
from pipeline.shards import read_shard_images
from pipeline.urls import resolve_split


def _foreign_images(url: str, manifest, index_info: dict) -> np.ndarray:
    """A foreign shard's images, decoded and fitted (square, the most common size) as training would."""
    from pipeline.foreign import SampleDecoder, iter_shard_samples
    from pipeline.urls import open_url

    height, width, channels = manifest.image_shape
    side = min(height, width)
    decoder = SampleDecoder((side, side, channels), index_info.get("image_key", "auto"), "none")
    images = []
    with open_url(url) as stream:
        for sample in iter_shard_samples(stream, url):
            try:
                images.append(decoder.image(sample))
            except ValueError:
                continue  # a preview shows the good ones; `pipeline verify` names the bad
    return np.stack(images) if images else np.zeros((0, side, side, channels), np.uint8)


def describe(location: str, *, preview: str | Path | None = None, num_preview: int = 64,
             seed: int = 0) -> str:
    """A text summary of the shards at `location`; writes a PNG grid of random samples to `preview`."""
    urls, counts, manifest = resolve_split(location, "train")
    height, width, channels = manifest.image_shape
    lines = [f"location   {location}",
             f"source     {manifest.source} (seed {manifest.seed}, tool {manifest.tool_version}, "
             f"manifest v{manifest.format_version})",
             f"images     {height}x{width}x{channels} uint8, layout {manifest.layout}"
             + (f" ({manifest.samples_per_block} per block)" if manifest.layout == "block" else ""),
             f"pixels     mean {manifest.pixel_mean:.4f} std {manifest.pixel_std:.4f} (in [0, 1])"
             + (f"; per channel mean {[round(m, 4) for m in manifest.channel_mean]}"
                if len(manifest.channel_mean) > 1 else "")]
    for split, shards in manifest.splits.items():
        sizes = [s.num_samples for s in shards]
        total_bytes = sum(s.num_bytes for s in shards)
        lines.append(f"{split:<10} {sum(sizes)} samples in {len(shards)} shards "
                     f"({min(sizes, default=0)}..{max(sizes, default=0)} per shard, "
                     f"{total_bytes / 2**20:.1f} MiB)")
        counts_by_class = manifest.extra.get("class_counts", {}).get(split)
        if counts_by_class:
            names = manifest.class_names or tuple(str(i) for i in range(len(counts_by_class)))
            lines.append("           classes " + ", ".join(f"{n}:{c}" for n, c in zip(names, counts_by_class)))
    index_info = manifest.extra.get("index") if manifest.layout == FOREIGN_LAYOUT else None
    if isinstance(index_info, dict):  # a foreign set: what `pipeline index` found
        lines.append(f"members    image {index_info.get('image_key')}, label {index_info.get('label_key')}; "
                     f"sizes {dict(list(index_info.get('image_sizes', {}).items())[:5])}, "
                     f"modes {index_info.get('image_modes')}; {index_info.get('num_problems', 0)} bad samples")
    if preview is not None and urls:
        rng = np.random.default_rng(seed)
        picked_images = []
        for index in rng.permutation(len(urls))[: max(1, min(len(urls), 4))]:
            if isinstance(index_info, dict):
                images = _foreign_images(urls[int(index)], manifest, index_info)
            else:
                images, _ = read_shard_images(urls[int(index)], manifest.image_shape)
            picked_images.append(images)
        pool = np.concatenate(picked_images)
        choice = rng.choice(len(pool), size=min(num_preview, len(pool)), replace=False)
        save_grid(pool[np.sort(choice)], preview, num_cols=8, scale=max(1, 64 // max(height, width)))
        lines.append(f"preview    {len(choice)} random training samples -> {preview}")
    return "\n".join(lines)
