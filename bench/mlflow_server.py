"""MLflow tracking server on PostgreSQL: memory and start time, default settings vs the k8s ones.

    flock /tmp/vae-bench.lock .venv/bin/python bench/mlflow_server.py [--metrics-calls 50] [--artifact-mib 20]

For each configuration a fresh PostgreSQL (scripts/start-postgres.sh) and a server on it; then
one client logs `--metrics-calls` batches of 100 metrics and one `--artifact-mib` artifact through
the server (proxied artifacts). Resident memory is the server process plus all its children,
sampled every 0.2 s. Prints a table and writes bench/results/mlflow_server.json. This sizes the
Deployment in k8s/mlflow/mlflow.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = {
    "defaults (4 workers, job runner)": ({}, []),
    "k8s (--workers 1, job execution off)": ({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, ["--workers", "1"]),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(process: psutil.Process) -> float:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def measure(name: str, env_extra: dict, args_extra: list[str], metrics_calls: int, artifact_mib: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="vae-bench-pg-"))
    base.chmod(0o755)
    pg_port, port = free_port(), free_port()
    started = subprocess.run(["bash", str(REPO / "scripts/start-postgres.sh"), str(base / "data"), str(pg_port)],
                             capture_output=True, text=True, check=True)
    uri = started.stdout.strip().splitlines()[-1]
    env = {**os.environ, **env_extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), *args_extra,
               "--backend-store-uri", uri, "--artifacts-destination", str(base / "artifacts")]
    t0 = time.monotonic()
    server = subprocess.Popen(command, env=env, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    process = psutil.Process(server.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() - t0 > 180:
                    raise RuntimeError(f"{name}: server did not start")
                time.sleep(0.2)
        ready_s = time.monotonic() - t0
        time.sleep(3)
        ready_mib = rss_mib(process)
        peak = [ready_mib]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(rss_mib(process))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("bench")
        run = client.create_run(experiment)
        t1 = time.monotonic()
        for call in range(metrics_calls):
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[Metric(f"m{i}", float(i), now, call) for i in range(100)])
        metrics_s = time.monotonic() - t1
        blob = base / "blob.bin"
        blob.write_bytes(os.urandom(artifact_mib << 20))
        t2 = time.monotonic()
        client.log_artifact(run.info.run_id, str(blob))
        artifact_s = time.monotonic() - t2
        client.set_terminated(run.info.run_id)
        time.sleep(1)
        stop.set()
        sampler.join()
        return {"config": name, "ready_s": round(ready_s, 1), "ready_mib": round(ready_mib),
                "peak_mib": round(max(peak)), "log_batch_ms": round(1000 * metrics_s / metrics_calls, 1),
                "artifact_mib_per_s": round(artifact_mib / artifact_s, 1)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        subprocess.run(["bash", str(REPO / "scripts/stop-postgres.sh"), str(base / "data")], check=False)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-calls", type=int, default=50, help="log_batch calls of 100 metrics")
    parser.add_argument("--artifact-mib", type=int, default=20, help="size of the artifact uploaded")
    args = parser.parse_args()
    rows = [measure(name, env, extra, args.metrics_calls, args.artifact_mib) for name, (env, extra) in CONFIGS.items()]
    header = ["config", "ready_s", "ready_mib", "peak_mib", "log_batch_ms", "artifact_mib_per_s"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.processor() or 'x86_64'}",
              "load_1m": os.getloadavg()[0], "args": vars(args), "rows": rows}
    out = REPO / "bench" / "results" / "mlflow_server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
