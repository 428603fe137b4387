"""Screenshot MLflow's chart view comparing the runs of one experiment, with headless Chromium.

    python scripts/mlflow_screenshot.py --backend-store-uri sqlite:///out/mlflow.db \
        --experiment vae-pipeline --out docs/mlflow-compare.png

Starts `mlflow ui` on a free local port, opens the experiment's runs page in chart mode, waits for
the plotly charts to render (a plain `--screenshot` captures the table but not the charts), saves a
PNG and stops the server. Needs chromium, chromium-driver (apt) and selenium (pip).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", required=True)
    parser.add_argument("--experiment", default="vae-pipeline")
    parser.add_argument("--out", default="docs/mlflow-compare.png")
    parser.add_argument("--size", default="1600,1100", help="window width,height in pixels")
    parser.add_argument("--settle-s", type=float, default=4.0, help="extra wait after the charts appear")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    experiment = MlflowClient(args.backend_store_uri).get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no experiment {args.experiment!r} in {args.backend_store_uri}", file=sys.stderr)
        return 1
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", args.backend_store_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    profile = tempfile.mkdtemp(prefix="chromium-")
    driver = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("error: mlflow ui did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not try to download a driver
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                     f"--window-size={args.size}"):
            options.add_argument(flag)
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
        driver = webdriver.Chrome(options=options, service=service)
        url = (f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs"
               "?compareRunsMode=CHART")
        driver.get(url)
        WebDriverWait(driver, 90).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot")))
        for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            try:  # the assistant side panel hides the charts; closing it is cosmetic, so never fatal
                button.click()
            except Exception:  # noqa: BLE001
                pass
        time.sleep(args.settle_s)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out} ({url})")
        return 0
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
