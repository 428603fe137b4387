"""k8s/ manifests, validated offline: Kubernetes schemas (strict), the PyTorchJob CRD schema kept in
the repo, the references between objects, and the torchrun/trainer command lines against the real
CLIs and README."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, VENV_BIN, subprocess_env

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
from kubernetes_validate import utils as kv  # noqa: E402

K8S = REPO / "k8s"
CRD_SCHEMA = K8S / "schemas" / "pytorchjob-kubeflow-v1.schema.json"
KUBERNETES_VERSION = "1.30"  # the oldest version the manifests target (Indexed Jobs, batch.kubernetes.io/job-name labels)
MLFLOW_MEASURED_MIB = 530  # bench/mlflow_server.py: peak on PostgreSQL, 1 worker, job execution off
MLFLOW_DEFAULT_MIB = 1500  # bench/mlflow_server.py: ready on PostgreSQL with the defaults (peak 3.2 GiB)


# ---------------------------------------------------------------- helpers (also used by other tests)

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in manifest_files() for doc in load_documents(path)]


def find(kind: str, name: str, path: Path | None = None) -> dict:
    """The one document of this kind and name (optionally in one file)."""
    docs = [doc for p, doc in all_documents()
            if doc["kind"] == kind and doc["metadata"]["name"] == name and (path is None or p == path)]
    assert len(docs) == 1, f"expected one {kind}/{name}, found {len(docs)}"
    return docs[0]


def pod_spec(doc: dict) -> dict:
    """The pod spec inside any workload (Deployment, StatefulSet, Job, PyTorchJob worker)."""
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    return doc["spec"]["template"]["metadata"]["labels"]


def workloads() -> list[tuple[Path, dict]]:
    kinds = {"Deployment", "StatefulSet", "Job", "PyTorchJob"}
    return [(p, d) for p, d in all_documents() if d["kind"] in kinds]


def container_env(container: dict) -> dict[str, str]:
    """Literal env values (secret/configmap references become 'secret:NAME/KEY')."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]
            kind, body = next(iter(ref.items()))
            env[item["name"]] = f"{kind}:{body['name']}/{body['key']}"
    return env


def expand_k8s_vars(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in command, args and env values: defined names are replaced,
    $$ escapes, undefined references stay as they are."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, text)


def torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def split_torchrun(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's own flags, and the trainer's flags after `-m train`."""
    assert "-m" in argv, f"torchrun must run the trainer as a module (-m train): {argv}"
    index = argv.index("-m")
    assert argv[index + 1] == "train", argv
    return argv[:index], argv[index + 2:]


def torchrun_dests(launcher_args: list[str]) -> dict[str, str]:
    """{dest: value} for the torchrun flags given (e.g. {'nnodes': '1:2'})."""
    actions = torchrun_parser()._option_string_actions
    found = {}
    for arg in launcher_args:
        flag, _, value = arg.partition("=")
        assert flag in actions, f"torchrun has no flag {flag}"
        found[actions[flag].dest] = value
    return found


LAUNCHER = ["python", "-m", "train.launch"]  # torchrun's main, exiting 143 on SIGTERM (train/launch.py)


def training_command(doc: dict) -> list[str]:
    """The training container's command line, as `torchrun ...` (the launcher takes torchrun's flags)."""
    container = next(c for c in pod_spec(doc)["containers"] if c["name"] == "pytorch")
    command = container["command"] + container["args"]
    assert command[:3] == LAUNCHER, f"training must run under {' '.join(LAUNCHER)} (exit 143 on preemption): {command}"
    return ["torchrun", *command[3:]]


def readme_scaling_out() -> str:
    text = (REPO / "README.md").read_text()
    assert "## Scaling out" in text, "README has no 'Scaling out' section"
    return text.split("## Scaling out", 1)[1]


def readme_torchrun_commands() -> list[list[str]]:
    """Every `torchrun ... -m train ...` command line in README's Scaling out code blocks."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme_scaling_out(), flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("torchrun ") and " -m train" in line:
                commands.append(shlex.split(line)[1:])
    return commands


# ---------------------------------------------------------------- schemas

CORE_DOCS = [(p, d) for p, d in all_documents() if d["kind"] != "PyTorchJob"]


@pytest.mark.parametrize("path, doc", CORE_DOCS,
                         ids=[f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}" for p, d in CORE_DOCS])
def test_manifest_validates_strictly_against_kubernetes_schemas(path, doc):
    kv.validate(doc, KUBERNETES_VERSION, strict=True)
    kv.validate(doc, kv.latest_version(), strict=True)


def test_kubernetes_validate_cli_passes_every_manifest():
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet",
                             *map(str, manifest_files())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # the CLI has no schema for the CRD; it says so (and the next test covers it)
    assert "ERROR" not in result.stdout


def crd_validator():
    import jsonschema
    from referencing import Registry, Resource

    version = kv.latest_version()
    definitions = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json",
                                        Resource.from_contents(definitions))
    schema = json.loads(CRD_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def pytorchjob() -> dict:
    return find("PyTorchJob", "vae-train")


def crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator().iter_errors(doc)]


def test_pytorchjob_validates_against_the_crd_schema_in_the_repo():
    assert crd_errors(pytorchjob()) == []


def _broken(mutate) -> dict:
    doc = copy.deepcopy(pytorchjob())
    mutate(doc)
    return doc


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d["spec"]["elasticPolicy"].update(rdzvBackends="c10d"), "misspelt field"),
    (lambda d: d["spec"]["elasticPolicy"].update(rdzvBackend="zookeeper"), "unknown rendezvous backend"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"].update(Chief=d["spec"]["pytorchReplicaSpecs"]["Worker"]),
     "replica type other than Master/Worker"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"), "replicas not an integer"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "bad restart policy"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(name="trainer"),
     "no container named pytorch"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
     "unknown field inside the pod template"),
    (lambda d: d["spec"]["elasticPolicy"].update(nProcPerNode=1), "nprocPerNode given twice"),
    (lambda d: d["spec"].update(nprocPerNode="all"), "bad nprocPerNode"),
    (lambda d: d["metadata"].update(name="VAE_train"), "name not DNS-1035"),
])
def test_broken_pytorchjob_is_caught(mutate, why):
    assert crd_errors(_broken(mutate)), why


def test_broken_core_manifests_are_caught(tmp_path):
    serve = find("Deployment", "vae-serve")
    typo = copy.deepcopy(serve)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 8000}}
    wrong_type = copy.deepcopy(serve)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, KUBERNETES_VERSION, strict=True)
    # and the command-line tool, as CI or a pre-commit hook would run it, exits non-zero
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(typo))
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "readinesProbe" in result.stdout, result.stdout


# ---------------------------------------------------------------- references between objects

def test_every_volume_claim_secret_and_configmap_reference_exists():
    claims = {d["metadata"]["name"] for _, d in all_documents() if d["kind"] == "PersistentVolumeClaim"}
    secrets = {(d["metadata"]["name"], key) for _, d in all_documents() if d["kind"] == "Secret"
               for key in d.get("stringData", {})}
    configmaps = {(d["metadata"]["name"], key) for _, d in all_documents() if d["kind"] == "ConfigMap"
                  for key in d.get("data", {})}
    for path, doc in workloads():
        spec = pod_spec(doc)
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (path, volume)
        mounted = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        assert mounted <= {v["name"] for v in spec.get("volumes", [])} | templates, path
        for container in spec["containers"]:
            for value in container_env(container).values():
                if value.startswith("secretKeyRef:"):
                    assert tuple(value.split(":", 1)[1].split("/")) in secrets, (path, value)
                if value.startswith("configMapKeyRef:"):
                    assert tuple(value.split(":", 1)[1].split("/")) in configmaps, (path, value)


def test_services_pdbs_hpas_and_policies_select_real_pods():
    pods = [(d, pod_labels(d)) for _, d in workloads()]

    def selected(selector: dict) -> list[dict]:
        return [d for d, labels in pods if selector.items() <= labels.items()]

    for _, doc in all_documents():
        kind = doc["kind"]
        if kind == "Service":
            selector = doc["spec"]["selector"]
            if "batch.kubernetes.io/job-name" in selector:  # set by the Job controller on its pods
                job = find("Job", selector["batch.kubernetes.io/job-name"])
                assert pod_spec(job)["subdomain"] == doc["metadata"]["name"]
                continue
            targets = selected(selector)
            assert targets, f"Service {doc['metadata']['name']} selects no pods"
            names = {p.get("name") for d in targets for c in pod_spec(d)["containers"] for p in c.get("ports", [])}
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in names, (doc["metadata"]["name"], port)
        elif kind in ("PodDisruptionBudget",):
            assert selected(doc["spec"]["selector"]["matchLabels"]), doc["metadata"]["name"]
        elif kind == "NetworkPolicy":
            assert selected(doc["spec"]["podSelector"]["matchLabels"]), doc["metadata"]["name"]
        elif kind == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            find(target["kind"], target["name"])
            assert doc["spec"]["minReplicas"] >= 2, "one replica cannot survive a node drain"


def test_images_are_pinned_and_built_from_the_repo_dockerfiles():
    for path, doc in workloads():
        for container in pod_spec(doc)["containers"]:
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"{path}: unpinned image {image}"
            if image.startswith("registry.example.com/vae-pipeline/"):
                role = name.rsplit("/", 1)[1]
                assert (REPO / "docker" / f"{role}.Dockerfile").is_file(), f"no docker/{role}.Dockerfile for {image}"


def test_project_commands_in_containers_parse_with_the_real_clis():
    """`python -m STAGE ...` in every container is accepted by that stage's own argument parser."""
    import importlib

    seen = set()
    for path, doc in workloads():
        for container in pod_spec(doc)["containers"]:
            argv = container.get("command", []) + container.get("args", [])
            if argv[:2] != ["python", "-m"] or argv[:3] == LAUNCHER:  # torchrun's flags: checked with its parser below
                continue
            stage = argv[2]
            assert (REPO / stage / "__main__.py").is_file(), f"{path}: no package {stage}"
            module = importlib.import_module(f"{stage}.__main__")
            module.build_parser().parse_args(argv[3:])  # SystemExit on an unknown flag or subcommand
            seen.add(stage)
    assert seen == {"pipeline", "export", "serve"}


# ---------------------------------------------------------------- training: cluster == local

def test_training_manifests_run_the_same_trainer_flags_the_trainer_accepts():
    from train.config import parse_args

    kubeflow, plain = training_command(pytorchjob()), training_command(find("Job", "vae-train"))
    assert kubeflow[0] == plain[0] == "torchrun"
    trainer_args = split_torchrun(kubeflow[1:])[1]
    assert trainer_args == split_torchrun(plain[1:])[1], "the two training manifests drifted apart"
    config = parse_args(trainer_args)
    assert config.data.shards == "/data/shards" and config.run.out_dir.startswith("/checkpoints/")
    for doc in (pytorchjob(), find("Job", "vae-train")):
        launcher, trainer = split_torchrun(training_command(doc)[1:])
        parsed = torchrun_parser().parse_args([*launcher, "-m", "train", *trainer])
        assert parsed.module and parsed.training_script == "train" and parsed.training_script_args == trainer
        assert parsed.rdzv_backend == "c10d" and parsed.max_restarts >= 1


def test_trainer_help_lists_every_flag_the_manifests_and_readme_use():
    result = subprocess.run([str(VENV_BIN / "python"), "-m", "train", "--help"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"(--[a-z_]+\.[a-z_]+)=", result.stdout))
    used = set()
    for command in [training_command(pytorchjob()), training_command(find("Job", "vae-train")),
                    *(["torchrun", *c] for c in readme_torchrun_commands())]:
        used |= {arg.split("=", 1)[0] for arg in split_torchrun(command[1:])[1]}
    assert used and used <= flags, used - flags


def test_readme_documents_the_torchrun_flags_the_manifests_use():
    from train.config import parse_args

    commands = readme_torchrun_commands()
    assert len(commands) >= 2, "README should show the command for each bare machine"
    documented = set()
    for argv in commands:
        launcher, trainer = split_torchrun(argv)
        documented |= set(torchrun_dests(launcher))
        parse_args([a for a in trainer if "$" not in a])
    for doc in (pytorchjob(), find("Job", "vae-train")):
        launcher, _ = split_torchrun(training_command(doc)[1:])
        assert set(torchrun_dests(launcher)) <= documented, set(torchrun_dests(launcher)) - documented


def test_pytorchjob_flags_agree_with_its_elastic_policy():
    """The operator passes elasticPolicy to torchrun as PET_* variables; the explicit flags must agree."""
    job = pytorchjob()
    spec, policy = job["spec"], job["spec"]["elasticPolicy"]
    flags = torchrun_dests(split_torchrun(training_command(job)[1:])[0])
    assert flags["nnodes"] == f"{policy['minReplicas']}:{policy['maxReplicas']}"
    assert policy["minReplicas"] <= spec["pytorchReplicaSpecs"]["Worker"]["replicas"] <= policy["maxReplicas"]
    assert flags["nproc_per_node"] == spec["nprocPerNode"]
    assert flags["rdzv_backend"] == policy["rdzvBackend"] == "c10d"
    assert flags["rdzv_endpoint"] == f"{job['metadata']['name']}-worker-0:{policy['rdzvPort']}"
    assert flags["rdzv_id"] == policy["rdzvId"]
    assert int(flags["max_restarts"]) == policy["maxRestarts"]
    assert "Master" not in spec["pytorchReplicaSpecs"], "elastic jobs are Worker-only; worker 0 hosts rendezvous"
    container = pod_spec(job)["containers"][0]
    assert {"name": "pytorchjob-port", "containerPort": policy["rdzvPort"]} in container["ports"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(flags["nproc_per_node"]) == gpus, "one process per GPU"


def test_indexed_job_flags_agree_with_the_job_and_its_headless_service():
    job, service = find("Job", "vae-train"), find("Service", "vae-train")
    flags = torchrun_dests(split_torchrun(training_command(job)[1:])[0])
    assert job["spec"]["completionMode"] == "Indexed"
    assert flags["nnodes"] == str(job["spec"]["completions"]) == str(job["spec"]["parallelism"])
    host, port = flags["rdzv_endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod_spec(job)['subdomain']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert pod_spec(job)["restartPolicy"] == "OnFailure"


@pytest.mark.parametrize("name, kind", [("vae-train", "PyTorchJob"), ("vae-train", "Job")])
def test_training_pods_restart_safely_resume_and_track_to_the_server(name, kind):
    doc = find(kind, name)
    container = next(c for c in pod_spec(doc)["containers"] if c["name"] == "pytorch")
    env = container_env(container)
    # FIELD-NOTES: without it a restarted worker group cannot reconnect (gloo connectFullMesh / hang)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    service = find("Service", "mlflow")
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{service['spec']['ports'][0]['port']}"
    # checkpoints on the shared persistent volume, where a rescheduled pod finds them
    _, trainer = split_torchrun(training_command(doc)[1:])
    out_dir = next(a.split("=", 1)[1] for a in trainer if a.startswith("--run.out_dir="))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    mount = next(path for path in mounts if out_dir.startswith(path + "/"))
    assert volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"] == "vae-checkpoints"
    claim = find("PersistentVolumeClaim", "vae-checkpoints")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every node reads the checkpoint on resume"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


# ---------------------------------------------------------------- MLflow and serving

def mlflow_container() -> dict:
    return pod_spec(find("Deployment", "mlflow"))["containers"][0]


def test_mlflow_server_is_sized_and_configured_as_measured():
    container = mlflow_container()
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"] and "--workers=1" in args
    assert "--serve-artifacts" in args and any(a.startswith("--artifacts-destination=") for a in args)
    env = container_env(container)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["POSTGRES_PASSWORD"].startswith("secretKeyRef:") and env["AWS_SECRET_ACCESS_KEY"].startswith("secretKeyRef:")

    def mib(quantity: str) -> float:
        number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
        return float(number) * {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[unit]

    resources = container["resources"]
    assert MLFLOW_MEASURED_MIB <= mib(resources["requests"]["memory"]) <= mib(resources["limits"]["memory"])
    assert mib(resources["limits"]["memory"]) < MLFLOW_DEFAULT_MIB, "a limit that fits the default config hides a misconfiguration"


def test_mlflow_allowed_hosts_admit_in_cluster_clients_only():
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = find("ConfigMap", "mlflow-config")["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("mlflow:5000", "mlflow.vae.svc.cluster.local:5000", "mlflow", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_serving_deployment_is_locked_down_and_probed():
    deployment = find("Deployment", "vae-serve")
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] == "models")
    policy = find("NetworkPolicy", "vae-serve")
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"]
    assert find("PodDisruptionBudget", "vae-serve")["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_readme_shows_how_to_apply_every_manifest():
    section = readme_scaling_out()
    for path in manifest_files():
        assert str(path.relative_to(REPO)) in section, f"README Scaling out never mentions {path.relative_to(REPO)}"
