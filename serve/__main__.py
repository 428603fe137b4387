"""`python -m serve COMMAND`: generate, encode, score, reconstruct, interpolate, traverse, http.

Every command runs from the exported ONNX files alone (a directory, or models:/NAME/VERSION|@ALIAS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cli import EXIT_FAILURE, EXIT_OK, MissingExtraError
from serve import ops
from serve.ops import Direct

PLOT_METHODS = {"pca": "PCA", "tsne": "t-SNE"}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="directory written by `python -m export`, or models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--cpu", action="store_true", help="use the CPU provider even when a GPU is there")
    parser.add_argument("--providers", default="tensorrt,cuda,cpu",
                        help="execution providers in order of preference (GPU ones only used when a GPU exists)")
    parser.add_argument("--batch", type=int, default=0, help="rows per device call (0: 4096 on a GPU, 512 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    parser.add_argument("--no-spin", action="store_true",
                        help="idle onnxruntime threads sleep instead of spinning (frees CPU for writers on CPU-only hosts)")
    parser.add_argument("--variant", default="", help="a model.json variant such as fp16 ('' = default fp32)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ (default $MLFLOW_TRACKING_URI)")


def _add_input(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--input", required=required,
                        help="shard directory (manifest.json), a folder of images (labels from numeric subfolder "
                             "names), or one image file")
    parser.add_argument("--split", default="val", help="shard split to read: train, val or all")
    parser.add_argument("-n", "--num", type=int, default=0, help="use only the first N images (0: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Fast batched sampling, encoding, scoring and an HTTP service for an exported VAE "
                    "(ONNX Runtime: TensorRT or CUDA when a GPU is present, else CPU). Imports no torch.")
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    generate = commands.add_parser("generate", help="sample new images to a folder (npy, png, wds) or one PNG grid",
                                   formatter_class=fmt)
    _add_common(generate)
    generate.add_argument("-n", "--num", type=int, default=64, help="number of samples")
    generate.add_argument("--out", required=True, help="output folder, or FILE.png for a single grid")
    generate.add_argument("--format", choices=("npy", "png", "wds"), default=None,
                          help="output format in the folder (default: npy; a grid when --out ends in .png)")
    generate.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
    generate.add_argument("--temperature", type=float, default=1.0, help="scale of z ~ N(0, I)")
    generate.add_argument("--workers", type=int, default=2, help="writer threads overlapping with decoding")
    generate.add_argument("--samples-per-shard", type=int, default=10_000, help="wds: samples per tar shard")
    generate.add_argument("--layout", choices=("auto", "block", "npy", "png"), default="auto",
                          help="wds: how images sit in the tar, as in `pipeline shards` (auto: blocks of raw "
                               "pixels for small images, PNG for large ones)")
    generate.add_argument("--grid", default=None, help="also write a contact sheet of the first 64 samples")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")

    reconstruct = commands.add_parser("reconstruct", help="encode and decode real images to a PNG grid",
                                      formatter_class=fmt)
    _add_common(reconstruct)
    _add_input(reconstruct)
    reconstruct.set_defaults(num=32)
    reconstruct.add_argument("--out", required=True, help="PNG grid to write (original, reconstruction pairs)")

    encode = commands.add_parser("encode", help="latents of images to .npy or .parquet (+ a 2-D plot)",
                                 formatter_class=fmt)
    _add_common(encode)
    _add_input(encode)
    encode.add_argument("--out", required=True, help="latents.npy (posterior means, N x latent) or latents.parquet "
                                                     "(key, label, mean_*, logvar_*)")
    encode.add_argument("--sample", action="store_true", help="write sampled z ~ q(z|x) instead of the means")
    encode.add_argument("--seed", type=int, default=0, help="noise seed for --sample")
    encode.add_argument("--plot", default=None, help="PNG scatter of the posterior means in 2-D, coloured by label")
    encode.add_argument("--plot-method", choices=PLOT_METHODS, default="pca",
                        help="how --plot maps the latents to 2-D: pca (linear, fast) or tsne (scikit-learn's t-SNE: "
                             "keeps neighbours together, so classes show as clusters; seconds per thousand images)")

    score = commands.add_parser("score", help="anomaly scores to CSV (higher = more anomalous); ROC AUC with labels",
                                formatter_class=fmt)
    _add_common(score)
    _add_input(score)
    score.add_argument("--out", required=True, help="scores.csv (key, label, score[, is_anomaly])")
    score.add_argument("--kind", choices=ops.SCORE_KINDS, default="auto",
                       help=ops.SCORE_KIND_HELP)
    score.add_argument("--samples", type=int, default=1, help="z samples per image (K)")
    score.add_argument("--method", choices=("elbo", "iwae"), default="elbo",
                       help="elbo: mean negative ELBO over K draws; iwae: importance-weighted bound with K samples")
    score.add_argument("--complexity", choices=("none", "png"), default="none",
                       help="png: subtract each image's PNG code length from the likelihood (input-complexity "
                            "correction, Serra et al. 2020; implies --kind likelihood under auto)")
    score.add_argument("--seed", type=int, default=0, help="noise seed")
    score.add_argument("--maps", default=None, metavar="DIR",
                       help="also write one heat-map PNG per image to DIR: -log p(x|z) per pixel, black (0 nats) to "
                            "white (the image's largest value), with maps.csv giving each file's key and scale")
    score.add_argument("--labels", default=None,
                       help="comma-separated labels that count as anomalies (e.g. 9): report and store ROC AUC")
    score.add_argument("--calibrate", action="store_true",
                       help="treat the input as normal data and store the threshold for --target-fpr")
    score.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate for --calibrate")
    score.add_argument("--threshold-file", default=None,
                       help="where --calibrate stores the threshold (default: beside --out); when it exists "
                            "without --calibrate, scores are flagged against it")

    interpolate = commands.add_parser("interpolate", help="PNG strips between pairs of images", formatter_class=fmt)
    _add_common(interpolate)
    _add_input(interpolate)
    interpolate.add_argument("--pairs", default="0:1", help="comma-separated index pairs A:B into the input")
    interpolate.add_argument("--steps", type=int, default=10, help="images per strip, endpoints included")
    interpolate.add_argument("--mode", choices=("linear", "slerp"), default="linear", help="path through z")
    interpolate.add_argument("--out", required=True, help="PNG: one strip per pair")

    traverse = commands.add_parser("traverse", help="PNG grid varying each latent dimension of one image",
                                   formatter_class=fmt)
    _add_common(traverse)
    _add_input(traverse)
    traverse.add_argument("--index", type=int, default=0, help="which input image")
    traverse.add_argument("--dims", default="", help="comma-separated latent dimensions (default: all)")
    traverse.add_argument("--range", nargs=2, type=float, default=(-3.0, 3.0), metavar=("LOW", "HIGH"),
                          help="values each dimension takes")
    traverse.add_argument("--steps", type=int, default=9, help="values per dimension")
    traverse.add_argument("--out", required=True, help="PNG: one row per dimension")

    http = commands.add_parser("http", help="HTTP service with dynamic batching (FastAPI + uvicorn)",
                               formatter_class=fmt)
    _add_common(http)
    http.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000, help="TCP port")
    http.add_argument("--max-batch-size", type=int, default=64, help="most rows in one device call (1: no batching)")
    http.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    http.add_argument("--max-queue", type=int, default=256, help="most waiting requests per graph; then 503")
    http.add_argument("--max-items", type=int, default=256, help="most images or latents per request")
    http.add_argument("--max-body-bytes", type=int, default=16 << 20, help="largest request body (413 past it)")
    http.add_argument("--threshold-file", default=None, help="anomaly threshold JSON from `score --calibrate`")
    http.add_argument("--graceful-timeout-s", type=float, default=30.0, help="how long shutdown waits for requests")
    limits = http.add_argument_group("connection limits (what a client may send, and how slowly)")
    limits.add_argument("--max-header-bytes", type=int, default=16 << 10,
                        help="most bytes in a request's head (request line and headers); 431 past it")
    limits.add_argument("--max-headers", type=int, default=100, help="most header lines per request; 431 past it")
    limits.add_argument("--header-timeout-s", type=float, default=10.0,
                        help="longest wait for a request's head, from the connection's opening or the request's "
                             "first byte (slow or silent clients get 408 and are disconnected)")
    limits.add_argument("--body-timeout-s", type=float, default=30.0,
                        help="longest wait for a request's whole body after its head; 408 past it")
    limits.add_argument("--keep-alive-timeout-s", type=int, default=5,
                        help="an idle keep-alive connection is closed after this many seconds")
    limits.add_argument("--max-connections", type=int, default=1000,
                        help="open connections and requests in flight past which new requests get 503")
    http.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser


def load_runtime(args):
    from export.model_uri import resolve_model_dir
    from serve.runtime import RuntimeOptions, VAERuntime, parse_providers

    providers = ("CPUExecutionProvider",) if args.cpu else parse_providers(args.providers)
    model_dir = resolve_model_dir(args.model, tracking_uri=args.tracking_uri)
    return VAERuntime(model_dir, options=RuntimeOptions(
        providers=providers, batch_size=args.batch, intra_op_threads=args.threads, variant=args.variant,
        # the HTTP service runs many small device calls beside an event loop: spinning threads would starve it
        spinning=not args.no_spin and args.command != "http"))


def read_input(location: str, runtime, split: str = "val", limit: int = 0
               ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(x float (N, C, H, W) in [0, 1], labels or None, keys) from shards, an image folder or one image."""
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from serve.ops import image_from_bytes

    path = Path(location)
    channels, height, width = runtime.image_shape
    if (path / "manifest.json").is_file():
        from pipeline.manifest import read_manifest
        from pipeline.shards import read_shard_images

        manifest = read_manifest(path)
        splits = sorted(manifest.splits) if split == "all" else [split]
        images, labels, keys = [], [], []
        for name in splits:
            for shard in manifest.shards(name):
                if limit and len(keys) >= limit:
                    break
                shard_images, shard_labels = read_shard_images(path / shard.name, manifest.image_shape)
                images.append(shard_images)
                labels.append(shard_labels)
                keys += [f"{shard.name}:{i}" for i in range(len(shard_images))]
        found = np.concatenate(images) if images else np.zeros((0, height, width, channels), np.uint8)
        if limit:
            found, keys, labels = found[:limit], keys[:limit], [np.concatenate(labels)[:limit]] if labels else []
        label_array = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        return nhwc_to_nchw(to_unit_float(found)), (label_array if (label_array >= 0).any() else None), keys
    if path.is_file():
        files = [path]
    elif path.is_dir():
        suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
    else:
        raise FileNotFoundError(f"--input {location}: no such file or directory")
    if limit:
        files = files[:limit]
    if not files:
        raise ValueError(f"--input {location}: no images found (png, jpg, bmp, gif, webp)")
    images, labels = [], []
    for file in files:
        try:
            images.append(image_from_bytes(runtime.card, file.read_bytes()))
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from error
        labels.append(int(file.parent.name) if file.parent.name.isdigit() and file.parent != path else -1)
    label_array = np.asarray(labels, np.int64)
    keys = [str(f.relative_to(path) if path.is_dir() else f.name) for f in files]
    return nhwc_to_nchw(to_unit_float(np.stack(images))), (label_array if (label_array >= 0).all() else None), keys


def _report(what: str, count: int, seconds: float, runtime) -> None:
    print(f"{what}: {count} images in {seconds:.2f} s ({count / max(seconds, 1e-9):,.0f} images/s) "
          f"on {runtime.provider}")


def run_generate(runtime, args) -> None:
    from pipeline.images import nchw_to_nhwc, save_grid, to_uint8
    from serve.generate import generate

    if args.format is None and args.out.lower().endswith(".png"):  # the original single-grid usage
        started = time.perf_counter()
        images = Direct(runtime).run(ops.sample, args.num, seed=args.seed, temperature=args.temperature)
        seconds = time.perf_counter() - started
        save_grid(to_uint8(nchw_to_nhwc(images)), args.out, num_cols=8)
        print(f"wrote {args.num} samples to {args.out} ({args.num / seconds:.0f} images/s on {runtime.provider})")
        return
    report = generate(runtime, args.num, args.out, fmt=args.format or "npy", batch_size=args.batch,
                      seed=args.seed, temperature=args.temperature, workers=args.workers,
                      samples_per_shard=args.samples_per_shard, layout=args.layout, grid=args.grid,
                      progress=not args.no_progress)
    print(f"wrote {report.num_samples} samples as {args.format or 'npy'} to {report.out} in {report.seconds:.2f} s: "
          f"{report.samples_per_s:,.0f} samples/s (decoding {report.decode_seconds:.2f} s) on {report.provider}")


def run_reconstruct(runtime, args) -> None:
    from pipeline.images import nchw_to_nhwc, save_grid, to_uint8

    x, _, _ = read_input(args.input, runtime, args.split, args.num)
    started = time.perf_counter()
    recon = Direct(runtime).run(ops.reconstruct, x)
    seconds = time.perf_counter() - started
    pairs = np.stack([x, recon], axis=1).reshape(-1, *x.shape[1:])  # original, reconstruction, ...
    save_grid(to_uint8(nchw_to_nhwc(pairs)), args.out, num_cols=8)
    print(f"wrote {len(x)} original/reconstruction pairs to {args.out} "
          f"({len(x) / max(seconds, 1e-9):,.0f} images/s on {runtime.provider})")


def run_encode(runtime, args) -> None:
    from pipeline.cli import require

    # optional outputs: found missing before any encoding is done
    if Path(args.out).suffix == ".parquet":
        require("pyarrow.parquet", "analysis", "serve encode --out *.parquet")
    if args.plot:
        require("matplotlib", "analysis", "serve encode --plot")
        if args.plot_method == "tsne":
            require("sklearn.manifold", "analysis", "serve encode --plot-method tsne")
    x, labels, keys = read_input(args.input, runtime, args.split, args.num)
    started = time.perf_counter()
    posterior = Direct(runtime).run(ops.encode, x)
    mean, logvar = posterior.mean, posterior.logvar
    latents = posterior.sample(args.seed) if args.sample else mean
    _report("encoded", len(x), time.perf_counter() - started, runtime)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"key": keys, "label": labels if labels is not None else np.full(len(x), -1)}
        name = "z" if args.sample else "mean"
        columns.update({f"{name}_{d}": latents[:, d] for d in range(latents.shape[1])})
        columns.update({f"logvar_{d}": logvar[:, d] for d in range(logvar.shape[1])})
        pq.write_table(pa.table(columns), out)
    elif out.suffix == ".npy":
        np.save(out, latents)
        if labels is not None:
            np.save(out.with_suffix(".labels.npy"), labels)
    else:
        raise ValueError(f"--out must end in .npy or .parquet, got {out}")
    print(f"wrote {latents.shape} latents to {out}")
    if args.plot:
        from serve.analysis import embed_2d, plot_2d

        points, axes = embed_2d(mean, args.plot_method, seed=args.seed)
        plot_2d(points, labels, args.plot, axes=axes,
                title=f"{len(x)} images, {PLOT_METHODS[args.plot_method]} of {mean.shape[1]}-d posterior means")
        print(f"wrote a 2-D plot ({args.plot_method}) to {args.plot}")


ScoreIdentity = tuple[str, str, str]
"""(kind, method, complexity): a threshold only means something for scores computed alike."""


def read_threshold(path) -> tuple[float, ScoreIdentity]:
    """(threshold, the score it was calibrated on) from a `score --calibrate` file (files written before score
    kinds existed hold likelihoods)."""
    calibration = json.loads(Path(path).read_text())
    return float(calibration["threshold"]), (calibration.get("kind", "likelihood"), calibration.get("method", "elbo"),
                                             calibration.get("complexity", "none"))


def run_score(runtime, args) -> None:
    from serve.analysis import roc_auc, threshold_for_fpr

    x, labels, keys = read_input(args.input, runtime, args.split, args.num)
    started = time.perf_counter()
    result = Direct(runtime).run(ops.score, x, num_samples=args.samples, method=args.method, seed=args.seed,
                                 complexity=args.complexity, maps=args.maps is not None, kind=args.kind)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    scores, identity = result.scores, (result.kind, args.method, args.complexity)
    _report(f"scored ({result.kind}, {args.method}, K={args.samples}, complexity {args.complexity})", len(x),
            time.perf_counter() - started, runtime)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    threshold_file = Path(args.threshold_file) if args.threshold_file else out.with_name("threshold.json")
    threshold = None
    summary: dict = {"num_images": len(x), "kind": result.kind, "method": args.method, "num_samples": args.samples,
                     "complexity": args.complexity, "mean_score": float(scores.mean())}
    if args.calibrate:
        if not 0.0 < args.target_fpr < 1.0:
            raise ValueError(f"--target-fpr must be in (0, 1), got {args.target_fpr}")
        threshold = threshold_for_fpr(scores, args.target_fpr)
        threshold_file.write_text(json.dumps({"threshold": threshold, "target_fpr": args.target_fpr,
                                              "kind": result.kind, "method": args.method, "num_samples": args.samples,
                                              "complexity": args.complexity, "num_images": len(x),
                                              "model": str(runtime.model_dir)}, indent=2) + "\n")
        print(f"threshold {threshold:.3f} ({result.kind}) for a false-positive rate of {args.target_fpr} -> "
              f"{threshold_file}")
    elif args.threshold_file and threshold_file.is_file():
        threshold, calibrated = read_threshold(threshold_file)
        if calibrated != identity:  # a threshold only means something for its own score
            raise ValueError(f"{threshold_file} was calibrated with --kind {calibrated[0]} --method {calibrated[1]} "
                             f"--complexity {calibrated[2]}; scoring with --kind {identity[0]} --method "
                             f"{identity[1]} --complexity {identity[2]} would compare unlike scores")
    if args.labels is not None:
        if labels is None:
            raise ValueError(f"--labels needs labelled input; {args.input} has none")
        anomalous = {int(v) for v in args.labels.split(",") if v.strip()}
        positives = np.isin(labels, sorted(anomalous))
        if positives.all() or not positives.any():
            raise ValueError(f"--labels {args.labels}: need both anomalies and normal images in the input "
                             f"(found {int(positives.sum())} of {len(labels)} anomalous)")
        summary["roc_auc"] = roc_auc(scores, positives)
        summary["anomaly_labels"] = sorted(anomalous)
        print(f"ROC AUC {summary['roc_auc']:.4f} ({int(positives.sum())} anomalies {sorted(anomalous)}, "
              f"{int((~positives).sum())} normal)")
    with open(out, "w") as handle:
        handle.write("key,label,score" + (",is_anomaly" if threshold is not None else "") + "\n")
        for i, key in enumerate(keys):
            label = int(labels[i]) if labels is not None else -1
            flag = f",{int(scores[i] > threshold)}" if threshold is not None else ""
            handle.write(f"{key},{label},{scores[i]:.6f}{flag}\n")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {len(x)} scores to {out} (summary in {out.with_suffix('.json')})")
    if result.maps is not None:
        write_maps(result.maps, keys, Path(args.maps))
        print(f"wrote {len(x)} pixel maps to {args.maps}")


def write_maps(maps: np.ndarray, keys: list[str], folder: Path) -> None:
    """One heat-map PNG per image, NNNNNN-KEY.png (the index keeps names unique and in input order), and maps.csv
    with each file's key, largest value and sum in nats (the sum is the image's reconstruction term)."""
    from pipeline.images import encode_png
    from serve.analysis import heat_map

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file,key,max_nats,sum_nats"]
    for index, (values, key) in enumerate(zip(maps, keys)):
        name = f"{index:06d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', key)[:80]}.png"
        (folder / name).write_bytes(encode_png(heat_map(values)))
        rows.append(f"{name},{key},{values.max():.6f},{values.sum():.6f}")
    (folder / "maps.csv").write_text("\n".join(rows) + "\n")


def run_interpolate(runtime, args) -> None:
    from pipeline.images import nchw_to_nhwc, save_grid, to_uint8

    pairs = []
    for item in args.pairs.split(","):
        a, sep, b = item.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ValueError(f"--pairs: expected A:B index pairs like 0:1,2:3, got {item!r}")
        pairs.append((int(a), int(b)))
    needed = max(max(p) for p in pairs) + 1
    x, _, _ = read_input(args.input, runtime, args.split, max(args.num, needed))
    if needed > len(x):
        raise ValueError(f"--pairs needs image {needed - 1}, the input has {len(x)}")
    strips = [Direct(runtime).run(ops.interpolate, x[[a, b]], args.steps, args.mode) for a, b in pairs]
    save_grid(to_uint8(nchw_to_nhwc(np.concatenate(strips))), args.out, num_cols=args.steps)
    print(f"wrote {len(pairs)} {args.mode} interpolation strip(s) of {args.steps} to {args.out}")


def run_traverse(runtime, args) -> None:
    from pipeline.images import nchw_to_nhwc, save_grid, to_uint8

    x, _, _ = read_input(args.input, runtime, args.split, max(args.num, args.index + 1))
    if args.index >= len(x):
        raise ValueError(f"--index {args.index}: the input has {len(x)} images")
    dims = [int(d) for d in args.dims.split(",")] if args.dims.strip() else None
    grid = Direct(runtime).run(ops.traverse, x[args.index], dims, tuple(args.range), args.steps)
    save_grid(to_uint8(nchw_to_nhwc(grid.reshape(-1, *grid.shape[2:]))), args.out, num_cols=args.steps)
    print(f"wrote a traversal of {grid.shape[0]} dimension(s) x {args.steps} values to {args.out}")


def run_http(runtime, args) -> None:
    from serve.batching import BatchingOptions
    from serve.http import TOKEN_ENV, ServerOptions, ServiceOptions, serve
    from serve.http_protocol import ConnectionLimits

    threshold, threshold_score = (read_threshold(args.threshold_file) if args.threshold_file
                                  else (None, ServiceOptions.threshold_score))
    options = ServiceOptions(
        batching=BatchingOptions(args.max_batch_size, args.max_queue_delay_ms, args.max_queue),
        max_items=args.max_items, max_body_bytes=args.max_body_bytes, token=os.environ.get(TOKEN_ENV, ""),
        threshold=threshold, threshold_score=threshold_score)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.token:
        print(f"warning: binding {args.host} without ${TOKEN_ENV}: anyone who can reach it can use it",
              file=sys.stderr)
    server = ServerOptions(
        ConnectionLimits(args.max_header_bytes, args.max_headers, args.header_timeout_s, args.body_timeout_s),
        keep_alive_timeout_s=args.keep_alive_timeout_s, max_connections=args.max_connections,
        graceful_timeout_s=args.graceful_timeout_s)
    serve(runtime, options, host=args.host, port=args.port, server=server, log_level=args.log_level)


COMMANDS = {"generate": run_generate, "reconstruct": run_reconstruct, "encode": run_encode, "score": run_score,
            "interpolate": run_interpolate, "traverse": run_traverse, "http": run_http}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runtime = load_runtime(args)
        COMMANDS[args.command](runtime, args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, MissingExtraError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
