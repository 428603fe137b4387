"""MLflow on a real PostgreSQL, driven by the commands in k8s/: the server runs the Deployment's
command and environment, training runs the Job's torchrun command as two agents ("nodes") meeting
through c10d rendezvous, and export runs the export Job's command, all against that server.

Only what cannot exist here is swapped: host names and ports (127.0.0.1), paths (tmp), the S3
bucket (a local directory; the server proxies artifacts either way) and the run length."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN, free_port, stop_process_group, subprocess_env, wait_until_healthy
from tests.test_k8s import container_env, expand_k8s_vars, find, pod_spec, split_torchrun, training_command

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
HAVE_POSTGRES = bool(PG_BIN_DIRS and (PG_BIN_DIRS[-1] / "initdb").exists()) or shutil.which("initdb") is not None
PASSWORD = "vae-test-pw"
MAX_STEPS = 60
CRASH_AFTER_STEP = 20  # a worker on the second node is killed once this checkpoint exists


def _skip_reason() -> str | None:
    if not HAVE_POSTGRES:
        return "PostgreSQL server binaries not installed (apt-get install -y postgresql)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no postgres user to run the server as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 not installed (pip install psycopg2-binary, in the dev extra)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


@pytest.fixture(scope="module")
def postgres():
    base = Path(tempfile.mkdtemp(prefix="vae-pg-"))
    base.chmod(0o755)  # the server runs as the postgres user when we are root
    datadir, port = base / "data", free_port()
    started = subprocess.run(["bash", str(REPO / "scripts" / "start-postgres.sh"), str(datadir), str(port), PASSWORD],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield {"port": port, "uri": started.stdout.strip().splitlines()[-1], "datadir": datadir}
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "stop-postgres.sh"), str(datadir)], timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def manifest_env(container: dict, overrides: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: in order, $(VAR) expanded from earlier
    entries; Secret and ConfigMap values from k8s/ unless overridden."""
    secrets = {}
    for doc_kind in ("Secret", "ConfigMap"):
        from tests.test_k8s import all_documents

        for _, doc in all_documents():
            if doc["kind"] == doc_kind:
                for key, value in (doc.get("stringData") or doc.get("data") or {}).items():
                    secrets[f"{'secretKeyRef' if doc_kind == 'Secret' else 'configMapKeyRef'}:"
                            f"{doc['metadata']['name']}/{key}"] = value
    env: dict[str, str] = {}
    for name, value in container_env(container).items():
        if name in overrides:
            env[name] = overrides[name]
        else:
            env[name] = expand_k8s_vars(secrets.get(value, value), env)
    return env


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` exactly as k8s/mlflow/mlflow.yaml runs it, on the real PostgreSQL."""
    psutil = pytest.importorskip("psutil")
    container = pod_spec(find("Deployment", "mlflow"))["containers"][0]
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    port = free_port()
    env = manifest_env(container, {"POSTGRES_PASSWORD": PASSWORD, "ARTIFACTS_DESTINATION": str(artifacts),
                                   "HOME": str(artifacts.parent)})
    # the Service name the manifest points at is this machine's PostgreSQL
    env["BACKEND_STORE_URI"] = env["BACKEND_STORE_URI"].replace("@mlflow-postgres:5432/", f"@127.0.0.1:{postgres['port']}/")
    assert env["BACKEND_STORE_URI"] == postgres["uri"], "manifest's URI and the database's differ beyond the host"
    argv = [expand_k8s_vars(arg, env) for arg in container["command"] + container["args"]]
    argv = [{"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}.get(a, a) for a in argv]
    argv[0] = str(VENV_BIN / argv[0])
    log = (artifacts.parent / "mlflow-server.log").open("w")
    process = subprocess.Popen(argv, env={**subprocess_env(), **env}, stdout=log, stderr=subprocess.STDOUT,
                               cwd=artifacts.parent, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", process, 90, artifacts.parent / "mlflow-server.log")
        server = psutil.Process(process.pid)
        time.sleep(2)  # let the workers settle after the first /health
        yield {"url": url, "artifacts": artifacts, "process": server, "env": env, "port": port,
               "ready_rss_mib": rss_mib(server)}
    finally:
        stop_process_group(process, timeout_s=30)
        log.close()


def rss_mib(process) -> float:
    """Resident memory of a process and its children (gunicorn/uvicorn workers)."""
    processes = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes) / 2**20


@pytest.fixture(scope="module")
def cluster_run(mlflow_server, small_shards, tmp_path_factory):
    """The indexed Job's torchrun command, started twice on this machine as two one-process nodes."""
    work = tmp_path_factory.mktemp("cluster")
    job = find("Job", "vae-train")
    container = next(c for c in pod_spec(job)["containers"] if c["name"] == "pytorch")
    launcher, trainer = split_torchrun(training_command(job)[1:])
    rendezvous = free_port()
    replace = {
        "--rdzv_endpoint": f"127.0.0.1:{rendezvous}",
        "--data.shards": str(small_shards),
        "--run.out_dir": str(work / "checkpoints" / "vae-train"),
        "--run.max_steps": str(MAX_STEPS),
        "--data.batch_size": "32",
        "--data.num_workers": "0",  # two cores for two ranks
    }

    def swap(arg: str) -> str:
        flag = arg.split("=", 1)[0]
        return f"{flag}={replace[flag]}" if flag in replace else arg

    extra = ["--run.log_interval_steps=10", "--run.eval_interval_steps=20", "--run.checkpoint_interval_steps=20",
             "--optim.warmup_steps=5", "--run.final_iwae_samples=10"]
    argv = [str(VENV_BIN / "torchrun"), *map(swap, launcher), "-m", "train", *map(swap, trainer), *extra]
    env = {**subprocess_env(), **manifest_env(container, {"MLFLOW_TRACKING_URI": mlflow_server["url"],
                                                          "OMP_NUM_THREADS": "1"})}
    started = time.monotonic()
    nodes = [subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    peak = rss_mib(mlflow_server["process"])
    deadline = time.monotonic() + 300
    checkpoint = Path(replace["--run.out_dir"]) / "checkpoints" / f"step-{CRASH_AFTER_STEP:08d}"
    crashed = None
    while any(node.poll() is None for node in nodes) and time.monotonic() < deadline:
        peak = max(peak, rss_mib(mlflow_server["process"]))
        if crashed is None and checkpoint.is_dir():
            crashed = kill_worker(nodes, rank=1)
        time.sleep(0.5)
    outputs = []
    for node in nodes:
        if node.poll() is None:
            node.kill()
        out, err = node.communicate()
        outputs.append((node.returncode, out, err))
    for code, out, err in outputs:
        assert code == 0, err[-4000:]
    summaries = [json.loads(line) for _, out, _ in outputs for line in out.splitlines() if line.startswith("{")]
    assert crashed is not None, "training ended before the worker could be killed"

    trained_s = time.monotonic() - started
    export = find("Job", "vae-export")
    export_container = pod_spec(export)["containers"][0]
    export_argv = [{"/checkpoints/vae-train": replace["--run.out_dir"], "/models/vae": str(work / "model")}.get(a, a)
                   for a in export_container["command"]]
    export_argv[0] = str(VENV_BIN / "python")
    exported = subprocess.run(export_argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**subprocess_env(), **manifest_env(export_container,
                                                                      {"MLFLOW_TRACKING_URI": mlflow_server["url"]})})
    assert exported.returncode == 0, exported.stderr[-4000:]
    seconds = {"train": round(trained_s, 1), "export": round(time.monotonic() - started - trained_s, 1)}
    return {"seconds": seconds, "crashed": crashed, "stderr": [err for _, _, err in outputs], "summaries": summaries, "work": work, "model": work / "model", "export": exported,
            "peak_rss_mib": peak, "trainer_args": trainer}


def kill_worker(agents: list[subprocess.Popen], rank: int) -> int:
    """SIGKILL the training process of one global rank (a crash, as when a node's process dies)."""
    import psutil

    for agent in agents:
        for child in psutil.Process(agent.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and child.environ().get("LOCAL_RANK") == "0":
                    child.kill()
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    raise AssertionError(f"no worker process with RANK={rank}")


def client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server["url"], registry_uri=mlflow_server["url"])


def test_server_runs_on_postgresql_with_the_manifest_settings(mlflow_server, postgres):
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=postgres["port"], user="mlflow", password=PASSWORD,
                          dbname="mlflow") as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_name IN ('experiments', 'runs', "
                       "'metrics', 'alembic_version')")
        assert cursor.fetchone()[0] == 4, "MLflow created its schema in PostgreSQL"
    assert mlflow_server["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def _status(url: str, host: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
    request = urllib.request.Request(f"{url}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_in_cluster_host_names_are_accepted_and_others_refused(mlflow_server):
    """MLFLOW_SERVER_ALLOWED_HOSTS from the ConfigMap, enforced by the real server."""
    url = mlflow_server["url"]
    assert _status(url, "mlflow:5000") == 200
    assert _status(url, "mlflow.vae.svc.cluster.local:5000") == 200
    assert _status(url, "evil.example.com") == 403
    # kubelet probes send the pod IP as Host: /health must answer them whatever the allowed hosts
    probe = find("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert _status(url, "10.244.3.17:5000", probe["httpGet"]["path"]) == 200


def test_two_node_training_logs_one_run_to_the_server(cluster_run, mlflow_server):
    summaries = sorted(cluster_run["summaries"], key=lambda s: s["rank"])
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["world_size"] == 2 for s in summaries)
    assert summaries[0]["steps"] == summaries[1]["steps"] == MAX_STEPS

    mlflow = client(mlflow_server)
    experiment_name = next(a.split("=", 1)[1] for a in cluster_run["trainer_args"] if a.startswith("--run.experiment="))
    run_name = next(a.split("=", 1)[1] for a in cluster_run["trainer_args"] if a.startswith("--run.run_name="))
    experiment = mlflow.get_experiment_by_name(experiment_name)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per training job, however many nodes"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == run_name
    assert run.info.run_id == summaries[0]["mlflow_run_id"]
    assert run.data.params["data.batch_size"] == "32" and run.data.tags["world_size"] == "2"
    history = mlflow.get_metric_history(run.info.run_id, "train/neg_elbo")
    assert sorted({m.step for m in history}) == list(range(10, MAX_STEPS + 1, 10))
    assert history[-1].value < history[0].value
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "val/neg_elbo")][-1] == MAX_STEPS


def test_artifacts_went_through_the_server_to_the_artifact_store(cluster_run, mlflow_server):
    mlflow = client(mlflow_server)
    run_id = sorted(cluster_run["summaries"], key=lambda s: s["rank"])[0]["mlflow_run_id"]
    listed = [a.path for a in mlflow.list_artifacts(run_id, "checkpoint")]
    assert "checkpoint/state.pt" in listed
    # proxied: the files are in the server's --artifacts-destination, not in the client's cwd
    stored = list(mlflow_server["artifacts"].rglob("state.pt"))
    assert stored and all(run_id in str(p) for p in stored)
    assert not list(cluster_run["work"].rglob("mlartifacts"))


def test_a_killed_worker_restarts_the_group_which_resumes_from_the_checkpoint(cluster_run):
    """torchrun's --max_restarts with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 from the manifest: the
    group restarts on both nodes and the new processes resume from the newest checkpoint."""
    stderr = "\n".join(cluster_run["stderr"])
    resumed = re.findall(r"resumed from \S+ at step (\d+)", stderr)
    assert resumed and all(int(step) >= CRASH_AFTER_STEP for step in resumed), stderr[-3000:]
    checkpoints = sorted(p.name for p in (cluster_run["work"] / "checkpoints" / "vae-train" / "checkpoints").iterdir()
                         if p.name.startswith("step-"))
    assert checkpoints[-1] == f"step-{MAX_STEPS:08d}"


def test_export_job_command_exports_and_registers_against_the_server(cluster_run, mlflow_server):
    metadata = json.loads((cluster_run["model"] / "model.json").read_text())
    run_id = sorted(cluster_run["summaries"], key=lambda s: s["rank"])[0]["mlflow_run_id"]
    assert metadata["mlflow_run_id"] == run_id
    export_argv = pod_spec(find("Job", "vae-export"))["containers"][0]["command"]
    if "--register" in export_argv:
        name = export_argv[export_argv.index("--register") + 1]
        versions = client(mlflow_server).search_model_versions(f"name='{name}'")
        assert len(versions) == 1 and versions[0].run_id == run_id


def test_mlflow_server_stays_inside_the_manifest_memory_limit(cluster_run, mlflow_server):
    """Measured, not assumed: peak resident memory of the server (and its workers) during a real
    two-node job with image and checkpoint uploads, against the Deployment's limit."""
    limit = pod_spec(find("Deployment", "mlflow"))["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    request = pod_spec(find("Deployment", "mlflow"))["containers"][0]["resources"]["requests"]["memory"]
    measured = (f"ready {mlflow_server['ready_rss_mib']:.0f} MiB, peak {cluster_run['peak_rss_mib']:.0f} MiB "
                f"(train {cluster_run['seconds']['train']} s, export {cluster_run['seconds']['export']} s)")
    assert 100 < mlflow_server["ready_rss_mib"] <= cluster_run["peak_rss_mib"], measured
    assert cluster_run["peak_rss_mib"] < float(limit.removesuffix("Gi")) * 1024, measured
    # the request covers what a busy server was seen to use, so the scheduler places it honestly
    assert cluster_run["peak_rss_mib"] < float(request.removesuffix("Mi")), measured
