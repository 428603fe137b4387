"""`python -m serve generate|reconstruct`: sampling and reconstruction from the ONNX files."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Fast batched sampling and encoding from an exported VAE (ONNX Runtime: "
                    "CUDA when a GPU is present, else CPU). Imports no torch.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="directory written by `python -m export`")
    common.add_argument("--cpu", action="store_true", help="use the CPU provider even when CUDA is there")

    generate = commands.add_parser("generate", parents=[common], help="sample new images to a PNG grid",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    generate.add_argument("-n", "--num", type=int, default=64, help="number of samples")
    generate.add_argument("--out", required=True, help="PNG grid to write")
    generate.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
    generate.add_argument("--temperature", type=float, default=1.0, help="scale of z ~ N(0, I)")

    reconstruct = commands.add_parser("reconstruct", parents=[common],
                                      help="encode and decode real images to a PNG grid",
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    reconstruct.add_argument("--input", required=True, help="shard directory (manifest.json)")
    reconstruct.add_argument("--split", default="val", help="which split to read")
    reconstruct.add_argument("-n", "--num", type=int, default=32, help="number of images")
    reconstruct.add_argument("--out", required=True, help="PNG grid to write (original, reconstruction pairs)")
    return parser


def run_generate(runtime, args) -> None:
    from pipeline.images import nchw_to_nhwc, save_grid, to_uint8

    started = time.perf_counter()
    images = runtime.sample(args.num, seed=args.seed, temperature=args.temperature)
    seconds = time.perf_counter() - started
    save_grid(to_uint8(nchw_to_nhwc(images)), args.out, num_cols=8)
    print(f"wrote {args.num} samples to {args.out} ({args.num / seconds:.0f} images/s on {runtime.provider})")


def run_reconstruct(runtime, args) -> None:
    from pipeline.images import nchw_to_nhwc, nhwc_to_nchw, save_grid, to_uint8, to_unit_float
    from pipeline.manifest import read_manifest
    from pipeline.shards import read_shard_images

    manifest = read_manifest(args.input)
    images, _ = read_shard_images(f"{args.input}/{manifest.shards(args.split)[0].name}", manifest.image_shape)
    x = nhwc_to_nchw(to_unit_float(images[: args.num]))
    recon = runtime.reconstruct(x)
    pairs = np.stack([x, recon], axis=1).reshape(-1, *x.shape[1:])  # original, reconstruction, ...
    save_grid(to_uint8(nchw_to_nhwc(pairs)), args.out, num_cols=8)
    print(f"wrote {len(x)} original/reconstruction pairs to {args.out} (on {runtime.provider})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from serve.runtime import DEFAULT_PROVIDERS, VAERuntime

    try:
        providers = ("CPUExecutionProvider",) if args.cpu else DEFAULT_PROVIDERS
        runtime = VAERuntime(args.model, providers=providers)
        {"generate": run_generate, "reconstruct": run_reconstruct}[args.command](runtime, args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
