"""`python -m export`: verified ONNX, TensorRT engines, a Triton repository, the MLflow registry.

    python -m export [onnx] --checkpoint PATH | --run RUN_ID --out DIR [--precision fp32,fp16] [--opset N]
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

from pipeline.cli import EXIT_FAILURE, MissingExtraError

COMMANDS = ("onnx", "tensorrt", "triton", "register", "resolve")


class _DefaultCommandParser(argparse.ArgumentParser):
    """`python -m export --checkpoint ...` (no command) means `python -m export onnx --checkpoint ...`."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help"):
            args.insert(0, "onnx")
        return super().parse_known_args(args, namespace)


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
    parser = _DefaultCommandParser(
        prog="python -m export",
        description="Export a trained VAE to verified ONNX (the default command: `python -m export --checkpoint "
                    "RUN --out DIR` is `python -m export onnx ...`), then build TensorRT engines, write a Triton "
                    "repository or use the MLflow Model Registry. `python -m export COMMAND --help` for each.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=argparse.ArgumentParser)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    onnx = commands.add_parser(
        "onnx", formatter_class=fmt, help="checkpoint -> verified ONNX encoder and decoder (the default command)",
        description="Export a trained VAE's encoder (x -> mean, logvar) and decoder (z -> likelihood "
                    "params, image mean) to ONNX with a dynamic batch axis (EMA weights by default), verify "
                    "every file against PyTorch on real validation images and random latents, and write "
                    "model.json beside them. Nothing is written when verification fails.")
    onnx.set_defaults(handler=export_main)
    source = onnx.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run dir, checkpoints dir, step dir or state.pt (newest is used)")
    source.add_argument("--run", metavar="RUN_ID", help="MLflow run id: its logged checkpoint is exported")
    onnx.add_argument("--out", required=True, help="output directory for the ONNX files")
    onnx.add_argument("--precision", type=_precisions, default=("fp32",),
                      help="comma-separated: fp32 (always written: the default files) and/or fp16")
    onnx.add_argument("--shards", default=None,
                      help="shards holding the verification images (a directory, pattern, URL or pipe: "
                           "command); default: the checkpoint's data.shards when it is a local path or an "
                           "http(s) URL (a checkpoint never chooses a command to run)")
    onnx.add_argument("--opset", type=int, default=20, help="ONNX opset")
    onnx.add_argument("--weights", choices=("ema", "raw"), default="ema",
                      help="EMA weights (when the checkpoint has them) or the raw optimizer weights")
    onnx.add_argument("--tolerance", type=float, default=1e-4,
                      help="fp32: max absolute difference allowed between onnxruntime and PyTorch")
    onnx.add_argument("--tolerance-fp16", type=float, default=1e-2,
                      help="fp16: max absolute difference allowed on the image mean")
    onnx.add_argument("--optimize", type=_providers, default=(),
                      help="also write onnxruntime-optimised fp32 copies for these providers (cpu, cuda); "
                           "see BENCHMARKS.md for when it helps")
    onnx.add_argument("--tracking-uri", default=None,
                      help="MLflow tracking URI for --run and --register (default: $MLFLOW_TRACKING_URI)")
    onnx.add_argument("--register", metavar="NAME", default=None,
                      help="also log the export to its training run and register it as NAME (ONNX flavour) "
                           "and NAME-pyfunc (encode, sample, score through onnxruntime)")
    onnx.add_argument("--alias", default=None, help="with --register: point this alias at the new versions")
    _add_subcommands(commands, fmt)
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
    from train import load_checkpoint
    from train.checkpoint import model_from_checkpoint
    from train.config import config_from_dict

    with tempfile.TemporaryDirectory(prefix="export-run-") as scratch:
        checkpoint = args.checkpoint or _download_checkpoint(args.run, args.tracking_uri, Path(scratch))
        state = load_checkpoint(checkpoint)
        config = config_from_dict(state["config"])
        model = model_from_checkpoint(state, args.weights, checkpoint)
        weights = "ema" if args.weights == "ema" and state.get("ema") else "raw"
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
    if result.score_statistics:
        print(f"default anomaly score: {result.score_statistics['default']}, standardised on "
              f"{result.score_statistics['num_images']} validation images")
    if args.register:
        from export.registry import register_export

        registered = register_export(result.out_dir, args.register, alias=args.alias, tracking_uri=args.tracking_uri)
        print(registered.describe())
    return 0


def _add_subcommands(commands, fmt) -> None:
    tensorrt = commands.add_parser(
        "tensorrt", formatter_class=fmt, help="serialized TensorRT engines from an exported model",
        description="Build serialized TensorRT engines from an exported model directory (needs the tensorrt "
                    "package and an NVIDIA GPU).")
    tensorrt.set_defaults(handler=run_tensorrt)
    tensorrt.add_argument("--model", required=True, help="exported model directory (model.json)")
    tensorrt.add_argument("--precision", type=_precisions, default=("fp16", "fp32"), help="engines to build")
    tensorrt.add_argument("--batch", type=_batches, default=(1, 64, 1024),
                          help="optimisation profile MIN,OPT,MAX batch size")
    tensorrt.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace limit (MiB)")

    triton = commands.add_parser(
        "triton", formatter_class=fmt, help="a Triton Inference Server model repository",
        description="Write a Triton Inference Server model repository (encoder and decoder) from an exported "
                    "model directory.")
    triton.set_defaults(handler=run_triton)
    triton.add_argument("--model", required=True, help="exported model directory (model.json)")
    triton.add_argument("--out", required=True, help="model repository to write")
    triton.add_argument("--prefix", default="vae", help="model names: PREFIX_encoder, PREFIX_decoder")
    triton.add_argument("--max-batch-size", type=int, default=1024, help="Triton max_batch_size")
    triton.add_argument("--instances", type=int, default=1, help="model instances per device")
    triton.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance group kind")
    triton.add_argument("--queue-delay-us", type=int, default=500, help="dynamic batching max queue delay")
    triton.add_argument("--trt-precision", choices=("FP16", "FP32"), default="FP16",
                        help="TensorRT accelerator precision (GPU instances only)")

    register = commands.add_parser(
        "register", formatter_class=fmt, help="log an export to its run and register it in MLflow",
        description="Log an export to its training run and register it in the MLflow Model Registry: NAME (ONNX "
                    "flavour, signature, input example) and NAME-pyfunc (serve/pyfunc.py: encode, sample, score; "
                    "`mlflow models serve -m models:/NAME-pyfunc@ALIAS`).")
    register.set_defaults(handler=run_register)
    register.add_argument("--model", required=True, help="exported model directory (model.json)")
    register.add_argument("--name", required=True, help="registered model name")
    register.add_argument("--alias", default=None, help="point this alias at the new versions")
    register.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")

    resolve = commands.add_parser(
        "resolve", help="models:/NAME/VERSION or models:/NAME@ALIAS -> a local model directory",
        description="Turn models:/NAME/VERSION, models:/NAME@ALIAS or a directory into a local model "
                    "directory and print it.")
    resolve.set_defaults(handler=run_resolve)
    resolve.add_argument("uri")
    resolve.add_argument("--dst", default=None, help="download into this directory (default: a new temp dir)")
    resolve.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")


def run_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt import build_engines

    for engine in build_engines(args.model, precisions=args.precision, batch=args.batch,
                                workspace_mib=args.workspace_mib):
        print(f"built {engine}")
    return 0


def run_triton(args: argparse.Namespace) -> int:
    from export.triton import write_repository

    for path in write_repository(args.model, args.out, prefix=args.prefix, max_batch_size=args.max_batch_size,
                                 instances=args.instances, kind=args.kind, queue_delay_us=args.queue_delay_us,
                                 trt_precision=args.trt_precision):
        print(f"wrote {path}")
    return 0


def run_register(args: argparse.Namespace) -> int:
    from export.registry import register_export

    registered = register_export(args.model, args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    print(f"{registered.describe()} (run {registered.onnx.run_id})")
    return 0


def run_resolve(args: argparse.Namespace) -> int:
    from export.model_uri import resolve_model_dir

    print(resolve_model_dir(args.uri, dst=args.dst, tracking_uri=args.tracking_uri))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError, MissingExtraError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
