"""`serve generate` samples/s against the decoder's raw onnxruntime throughput, in the same run.

    flock /tmp/vae-bench.lock .venv/bin/python bench/generate.py --model out/model [-n 20000] [--batch 512]

Raw: `session.run` on pre-drawn latents, batch after batch, nothing converted or written. Generate:
the full `serve.generate.generate` (noise, decode, uint8, writer threads, files on disk). The two
are interleaved `--repeats` times and the median of each is kept; overhead = 1 - generate / raw.
Prints a table and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from serve.generate import generate
from serve.runtime import RuntimeOptions, VAERuntime, parse_providers


def run_generate(runtime: VAERuntime, spec: str, out: Path, args) -> float:
    """samples/s of one `generate` call; spec is a format, or wds/LAYOUT."""
    fmt, _, layout = spec.partition("/")
    report = generate(runtime, args.num, out, fmt=fmt, layout=layout or "auto", batch_size=args.batch,
                      workers=args.workers, progress=False)
    shutil.rmtree(out)
    return report.samples_per_s


def raw_decoder_rate(runtime: VAERuntime, num: int, batch: int) -> float:
    z = np.random.default_rng(0).standard_normal((num, runtime.latent_dim), dtype=np.float32)
    session, name = runtime.decoder.session, runtime.decoder.input.name
    started = time.perf_counter()
    for start in range(0, num, batch):
        session.run(["image"], {name: z[start:start + batch]})
    return num / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("-n", "--num", type=int, default=20_000, help="samples per measurement")
    parser.add_argument("--batch", type=int, default=512, help="decoder batch size (both sides)")
    parser.add_argument("--workers", type=int, default=2, help="writer threads for generate")
    parser.add_argument("--formats", default="npy,wds,wds/png,png",
                        help="output formats to measure; wds/LAYOUT picks a shard layout (wds alone: auto)")
    parser.add_argument("--quiet-formats", default="",
                        help="formats also measured with onnxruntime's idle threads not spinning ('' = none)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is kept")
    parser.add_argument("--providers", default="tensorrt,cuda,cpu", help="execution providers")
    parser.add_argument("--out", default="bench/results/generate.json", help="JSON results")
    args = parser.parse_args()

    runtime = VAERuntime(args.model, options=RuntimeOptions(providers=parse_providers(args.providers),
                                                            batch_size=args.batch))
    quiet = VAERuntime(args.model, options=RuntimeOptions(providers=parse_providers(args.providers),
                                                          batch_size=args.batch, spinning=False))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    quiet_formats = [f.strip() for f in args.quiet_formats.split(",") if f.strip()]
    raw_decoder_rate(runtime, min(args.num, 4 * args.batch), args.batch)  # warm-up
    raw_decoder_rate(quiet, min(args.num, 4 * args.batch), args.batch)
    rates: dict[str, list[float]] = {"raw": [], "raw (no spinning)": [], **{f: [] for f in formats},
                                     **{f"{f} (no spinning)": [] for f in quiet_formats}}
    scratch = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        for _ in range(args.repeats):
            rates["raw"].append(raw_decoder_rate(runtime, args.num, args.batch))
            for fmt in formats:
                rates[fmt].append(run_generate(runtime, fmt, scratch / "out", args))
            rates["raw (no spinning)"].append(raw_decoder_rate(quiet, args.num, args.batch))
            for fmt in quiet_formats:
                rates[f"{fmt} (no spinning)"].append(run_generate(quiet, fmt, scratch / "out", args))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    # each generate row is compared with the raw decoder run with the same session settings
    raw = {False: statistics.median(rates["raw"]), True: statistics.median(rates["raw (no spinning)"])}
    rows = [{"what": "raw decoder (session.run)", "samples_per_s": raw[False], "overhead": 0.0},
            {"what": "raw decoder (session.run, no spinning)", "samples_per_s": raw[True], "overhead": 0.0}]
    rows += [{"what": f"generate --format {key}", "samples_per_s": statistics.median(rates[key]),
              "overhead": 1.0 - statistics.median(rates[key]) / raw["no spinning" in key]}
             for key in rates if not key.startswith("raw")]
    print(f"provider {runtime.provider}, {args.num} samples, batch {args.batch}, {args.workers} writer threads, "
          f"median of {args.repeats}, load {os.getloadavg()[0]:.2f}")
    print(f"{'what':<40}{'samples/s':>12}{'overhead':>10}")
    for row in rows:
        print(f"{row['what']:<40}{row['samples_per_s']:>12,.0f}{row['overhead']:>10.1%}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "provider": runtime.provider,
              "num_samples": args.num, "batch": args.batch, "workers": args.workers, "repeats": args.repeats,
              "rows": rows, "all_rates": rates}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
