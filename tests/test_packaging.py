"""pyproject.toml's extras and bounds against the two pin files: constraints.txt (the tested set)
and constraints-min.txt (the floors, run in a venv of their own)."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LINUX = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(name: str) -> dict[str, Version]:
    found = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{name}: {line} is not pinned"
            found[normalise(requirement.name)] = Version(spec.version)
    return found


def direct_requirements() -> dict[str, list[Requirement]]:
    """{extra ('' for the core): its requirements, self-references like vae-pipeline[train] left out}."""
    groups = {"": PROJECT["dependencies"], **PROJECT["optional-dependencies"]}
    return {extra: [r for r in map(Requirement, texts) if normalise(r.name) != "vae-pipeline"]
            for extra, texts in groups.items()}


def everything() -> list[Requirement]:
    return [r for group in direct_requirements().values() for r in group]


def applies_on_linux(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(LINUX)


def test_every_floor_is_the_version_the_floor_set_installs():
    floors = pins("constraints-min.txt")
    for requirement in filter(applies_on_linux, everything()):
        if requirement.name in ("pytest", "pytest-timeout") or requirement in direct_requirements()["dev"]:
            continue  # test tools: the tested versions are the ones that count
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lower, f"{requirement}: no lower bound"
        name = normalise(requirement.name)
        assert name in floors, f"{name} is not in constraints-min.txt"
        floor = Version(floors[name].base_version)  # torch==2.13.0+cpu is the 2.13.0 floor
        assert floor == lower[0], f"{requirement}: pyproject's floor {lower[0]}, constraints-min.txt runs {floor}"


def test_the_tested_set_lies_within_the_declared_ranges():
    tested = pins("constraints.txt")
    for requirement in filter(applies_on_linux, everything()):
        name = normalise(requirement.name)
        assert name in tested, f"{name} is declared but constraints.txt does not pin it"
        assert requirement.specifier.contains(tested[name], prereleases=True), \
            f"{requirement}: constraints.txt pins {tested[name]}"


def test_private_mlflow_apis_are_capped_below_the_next_major():
    for requirement in everything():
        if normalise(requirement.name) in ("mlflow", "mlflow-skinny"):
            assert any(s.operator == "<" for s in requirement.specifier), requirement


@pytest.mark.parametrize("platform", [LINUX, {"platform_system": "Darwin", "platform_machine": "arm64",
                                              "sys_platform": "darwin"}], ids=["linux-x86_64", "macos"])
def test_no_combination_of_extras_installs_both_onnxruntimes(platform):
    names = {normalise(r.name) for r in everything() if r.marker is None or r.marker.evaluate(platform)}
    assert len(names & {"onnxruntime", "onnxruntime-gpu"}) == 1, names


def test_serve_extra_is_torch_free():
    serve = {normalise(r.name) for r in direct_requirements()["serve"] + direct_requirements()[""]}
    assert not serve & {"torch", "torchvision", "mlflow", "scikit-learn", "matplotlib", "pyarrow"}, serve
