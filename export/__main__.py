"""`python -m export`: verified ONNX, TensorRT engines, a Triton repository, the MLflow registry.

    python -m export --checkpoint PATH | --run RUN_ID --out DIR [--precision fp32,fp16] [--opset N]
    python -m export tensorrt --model DIR [--precision fp16,fp32] [--batch 1,64,1024]
    python -m export triton   --model DIR --out REPO [--max-batch-size N] [--instances N] [--kind gpu|cpu]
    python -m export register --model DIR --name NAME [--alias ALIAS] [--tracking-uri URI]
    python -m export resolve  URI [--dst DIR] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

SUBCOMMANDS = ("tensorrt", "triton", "register", "resolve")


def _precisions(text: str) -> tuple[str, ...]:
    values = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in values if p not in ("fp32", "fp16")]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of fp32,fp16, got {text!r}")
    return values


def _providers(text: str) -> tuple[str, ...]:
    values = tuple(p.strip() for p in text.split(",") if p.strip())
    if not values or any(p not in ("cpu", "cuda") for p in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of cpu,cuda, got {text!r}")
    return values


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a trained VAE's encoder (x -> mean, logvar) and decoder (z -> likelihood "
                    "params, image mean) to ONNX with a dynamic batch axis (EMA weights by default), verify "
                    "every file against PyTorch on real validation images and random latents, and write "
                    "model.json beside them. Nothing is written when verification fails. Subcommands: "
                    + ", ".join(SUBCOMMANDS) + " (python -m export SUBCOMMAND --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run dir, checkpoints dir, step dir or state.pt (newest is used)")
    source.add_argument("--run", metavar="RUN_ID", help="MLflow run id: its logged checkpoint is exported")
    parser.add_argument("--out", required=True, help="output directory for the ONNX files")
    parser.add_argument("--precision", type=_precisions, default=("fp32",),
                        help="comma-separated: fp32 (always written: the default files) and/or fp16")
    parser.add_argument("--shards", default=None,
                        help="shards holding the verification images (a directory, pattern, URL or pipe: "
                             "command); default: the checkpoint's data.shards when it is a local path or an "
                             "http(s) URL (a checkpoint never chooses a command to run)")
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="EMA weights (when the checkpoint has them) or the raw optimizer weights")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="fp32: max absolute difference allowed between onnxruntime and PyTorch")
    parser.add_argument("--tolerance-fp16", type=float, default=1e-2,
                        help="fp16: max absolute difference allowed on the image mean")
    parser.add_argument("--optimize", type=_providers, default=(),
                        help="also write onnxruntime-optimised fp32 copies for these providers (cpu, cuda); "
                             "see BENCHMARKS.md for when it helps")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for --run and --register (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--register", metavar="NAME", default=None,
                        help="also log the export to its training run and register it as NAME")
    parser.add_argument("--alias", default=None, help="with --register: point this alias at the new version")
    return parser


def checkpoint_shards(location: str) -> str:
    """The checkpoint's data.shards if every URL it names is read, not run (local, http(s), s3/gs); else ValueError.

    A checkpoint is data, often someone else's: nothing in it may choose a command to run.
    """
    from pipeline.urls import expand_urls, runs_a_command

    urls = expand_urls(location) if location else []
    executing = [url for url in urls if runs_a_command(url)]
    if not urls or executing:
        what = f"names {executing[0]!r}, which is run, not read" if executing else "is empty"
        raise ValueError(f"the checkpoint's data.shards {what}; a checkpoint never chooses a command to "
                         "run: pass --shards with the validation shards (directory, pattern, URL or "
                         "pipe: command of your own)")
    return location


def _validation_images(shards: str, config, max_images: int = 1024):
    """Up to `max_images` real validation images as float32 (N, C, H, W) in [0, 1], read and fitted
    to the model exactly as training read them (foreign shard sets included)."""
    import numpy as np

    from pipeline.data import open_train_val
    from pipeline.images import to_unit_float
    from pipeline.loader import iter_eval_batches

    data, size = config.data, config.model.image_size
    try:
        _, val = open_train_val(shards, image_shape=(size, size, config.model.channels), image_key=data.image_key,
                                label_key=data.label_key, samples_per_epoch=data.samples_per_epoch,
                                val_location=data.val_shards if shards == data.shards else "", announce=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no validation shards at {shards!r} ({error}); pass --shards DIR") from error
    batches, count = [], 0
    for images, _, mask in iter_eval_batches(val, batch_size=256, rank=0, world_size=1):
        batches.append(images[mask].numpy())
        count += int(mask.sum())
        if count >= max_images:
            break
    return to_unit_float(np.concatenate(batches)[:max_images]).astype(np.float32)  # uint8 NCHW -> [0, 1]


def _download_checkpoint(run_id: str, tracking_uri: str | None, into: Path) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint",
                                                        dst_path=str(into), tracking_uri=tracking_uri))
    except mlflow.exceptions.MlflowException as error:
        raise FileNotFoundError(f"MLflow run {run_id}: no checkpoint artifact ({error.message})") from error


def export_main(args: argparse.Namespace) -> int:
    from export.onnx_export import export_verified
    from train import load_model

    with tempfile.TemporaryDirectory(prefix="export-run-") as scratch:
        checkpoint = args.checkpoint or _download_checkpoint(args.run, args.tracking_uri, Path(scratch))
        model, config, state = load_model(checkpoint)
        weights = "ema" if state.get("ema") else "raw"
        if args.weights == "raw" and weights == "ema":
            model.load_state_dict(state["model"])
            weights = "raw"
        if args.shards:
            shards, chosen_by = args.shards, "--shards"
        else:
            shards, chosen_by = checkpoint_shards(config.data.shards), "the checkpoint's data.shards"
            if config.data.val_shards:  # read beside data.shards below: held to the same rule
                checkpoint_shards(config.data.val_shards)
        images = _validation_images(shards, config)
        print(f"verifying on {len(images)} validation images from {shards} ({chosen_by})")
        result = export_verified(model, config, state, args.out, images, precisions=args.precision,
                                 opset=args.opset, weights=weights, optimize_for=args.optimize,
                                 tolerances={"fp32": args.tolerance, "fp16": args.tolerance_fp16})
    for precision, report in result.reports.items():
        kept = result.fp32_layers.get(precision, [])
        note = f"; kept in fp32: {', '.join(b.describe() for b in kept)}" if kept else ""
        print(f"{precision}: max difference vs PyTorch {report.worst:.2e} at batch sizes "
              f"{list(report.batch_sizes)}{note}")
    print(f"exported {result.out_dir}/encoder.onnx and {result.out_dir}/decoder.onnx "
          f"({weights} weights, {', '.join(result.reports)})")
    if args.register:
        from export.registry import register_export

        version = register_export(result.out_dir, args.register, alias=args.alias, tracking_uri=args.tracking_uri)
        print(f"registered models:/{args.register}/{version.version}")
    return 0


def tensorrt_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export tensorrt",
                                     description="Build serialized TensorRT engines from an exported model "
                                                 "directory (needs the tensorrt package and an NVIDIA GPU).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (model.json)")
    parser.add_argument("--precision", type=_precisions, default=("fp16", "fp32"), help="engines to build")
    parser.add_argument("--batch", type=_batches, default=(1, 64, 1024),
                        help="optimisation profile MIN,OPT,MAX batch size")
    parser.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace limit (MiB)")
    args = parser.parse_args(argv)
    from export.tensorrt import build_engines

    for engine in build_engines(args.model, precisions=args.precision, batch=args.batch,
                                workspace_mib=args.workspace_mib):
        print(f"built {engine}")
    return 0


def triton_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export triton",
                                     description="Write a Triton Inference Server model repository "
                                                 "(encoder and decoder) from an exported model directory.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (model.json)")
    parser.add_argument("--out", required=True, help="model repository to write")
    parser.add_argument("--prefix", default="vae", help="model names: PREFIX_encoder, PREFIX_decoder")
    parser.add_argument("--max-batch-size", type=int, default=1024, help="Triton max_batch_size")
    parser.add_argument("--instances", type=int, default=1, help="model instances per device")
    parser.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance group kind")
    parser.add_argument("--queue-delay-us", type=int, default=500, help="dynamic batching max queue delay")
    parser.add_argument("--trt-precision", choices=("FP16", "FP32"), default="FP16",
                        help="TensorRT accelerator precision (GPU instances only)")
    args = parser.parse_args(argv)
    from export.triton import write_repository

    for path in write_repository(args.model, args.out, prefix=args.prefix, max_batch_size=args.max_batch_size,
                                 instances=args.instances, kind=args.kind, queue_delay_us=args.queue_delay_us,
                                 trt_precision=args.trt_precision):
        print(f"wrote {path}")
    return 0


def register_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export register",
                                     description="Log an export to its training run and register it in the "
                                                 "MLflow Model Registry (ONNX flavour, signature, input example).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (model.json)")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", default=None, help="point this alias at the new version")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    from export.registry import register_export

    version = register_export(args.model, args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    print(f"registered models:/{args.name}/{version.version} (run {version.run_id})")
    return 0


def resolve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export resolve",
                                     description="Turn models:/NAME/VERSION, models:/NAME@ALIAS or a directory "
                                                 "into a local model directory and print it.")
    parser.add_argument("uri")
    parser.add_argument("--dst", default=None, help="download into this directory (default: a new temp dir)")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    from export.registry import resolve_model_dir

    print(resolve_model_dir(args.uri, dst=args.dst, tracking_uri=args.tracking_uri))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"tensorrt": tensorrt_main, "triton": triton_main, "register": register_main,
                "resolve": resolve_main}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return export_main(build_parser().parse_args(argv))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
