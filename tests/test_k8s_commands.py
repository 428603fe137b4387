"""The containers' own commands from k8s/, run here: the shards Job writes shards that verify, and
the serving Deployment's command answers its probes (without the API token, as a kubelet calls
them) while the API itself wants the token from the Secret."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO, VENV_BIN, free_port, stop_process_group, subprocess_env
from tests.test_k8s import container_env, find, pod_spec

pytestmark = pytest.mark.slow


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # not listening yet
        return 0


def test_shards_job_command_writes_shards_that_verify(tmp_path):
    container = pod_spec(find("Job", "vae-shards"))["containers"][0]
    mount = container["volumeMounts"][0]["mountPath"]
    argv = [arg.replace(mount, str(tmp_path / "shards")) for arg in container["command"]]
    assert argv[:3] == ["python", "-m", "pipeline"]
    result = subprocess.run([str(VENV_BIN / "python"), *argv[1:]], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    verify = subprocess.run([str(VENV_BIN / "python"), "-m", "pipeline", "verify", str(tmp_path / "shards")],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # the training manifests read them where this Job wrote them
    job = find("Job", "vae-train")
    args = pod_spec(job)["containers"][0]["args"]
    assert f"--data.shards={mount}" in args


def test_serving_command_answers_the_manifest_probes(exported_model):
    deployment = find("Deployment", "vae-serve")
    container = pod_spec(deployment)["containers"][0]
    models_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    port = free_port()
    manifest_port = str(container["ports"][0]["containerPort"])
    argv = []
    for arg in container["command"]:
        if arg.startswith(models_mount + "/"):
            arg = str(exported_model)
        argv.append({"0.0.0.0": "127.0.0.1", manifest_port: str(port)}.get(arg, arg))
    token_env = next(name for name, value in container_env(container).items() if value.startswith("secretKeyRef:"))
    token = "test-token-123"
    process = subprocess.Popen([str(VENV_BIN / "python"), *argv[1:]], cwd=REPO, start_new_session=True,
                               env={**subprocess_env(), token_env: token}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        readiness = container["readinessProbe"]["httpGet"]["path"]
        liveness = container["livenessProbe"]["httpGet"]["path"]
        startup = container["startupProbe"]["httpGet"]["path"]
        while _get(base + readiness) != 200:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        assert _get(base + liveness) == 200 and _get(base + startup) == 200  # kubelets send no token
        assert _get(base + "/metrics") == 401 and _get(base + "/metrics", token) == 200
    finally:
        stop_process_group(process, timeout_s=60)
    # SIGTERM drains and exits within the pod's grace period
    assert process.returncode is not None
