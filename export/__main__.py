"""`python -m export --checkpoint PATH --out DIR`: verified ONNX encoder and decoder."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a trained VAE's encoder (x -> mean, logvar) and decoder "
                    "(z -> likelihood params, image mean) to ONNX with a dynamic batch axis, verify both against "
                    "PyTorch on real validation images, and write model.json beside them. "
                    "Nothing is written when verification fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, checkpoints dir, step dir or state.pt (newest is used)")
    parser.add_argument("--out", required=True, help="output directory for the ONNX files")
    parser.add_argument("--shards", default=None,
                        help="shard directory for verification images (default: the one in the checkpoint's config)")
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max absolute difference allowed between onnxruntime and PyTorch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np

    from export.onnx_export import export_model
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from pipeline.loader import open_split
    from pipeline.shards import read_shard_images
    from train import load_model

    try:
        model, config, state = load_model(args.checkpoint)
        val = open_split(args.shards or config.data.shards, "val")
        images, _ = read_shard_images(val.urls[0], val.manifest.image_shape)
        out, report = export_model(model, config, state, args.out,
                                   nhwc_to_nchw(to_unit_float(images)).astype(np.float32),
                                   opset=args.opset, tolerance=args.tolerance)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {out}/encoder.onnx and {out}/decoder.onnx "
          f"(max abs diff vs PyTorch {report.worst:.2e} at batch sizes {list(report.batch_sizes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
