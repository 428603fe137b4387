"""Write constraints.txt: the exact versions of everything `.[dev]` (and `.[cuda]`) installs, read from this venv.

    python scripts/freeze_constraints.py > constraints.txt

The closure is walked from pyproject.toml's own requirements (extras and markers evaluated for this
machine), so packages installed by hand for other reasons stay out. `make install` and CI install
with `-c constraints.txt`: the tested set, reproducibly.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "vae-pipeline"
ROOT_EXTRAS = ("dev", "cuda")  # cuda: the serving image's CUDA wheels (torch brings the same ones)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(extras: set[str]) -> list[Requirement]:
    """The project's requirements for `extras`, following self-references like vae-pipeline[train]."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    found, todo, done = list(map(Requirement, project["dependencies"])), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if normalise(requirement.name) == PROJECT:
                todo += sorted(requirement.extras)
            else:
                found.append(requirement)
    return found


def closure(roots: list[Requirement]) -> dict[str, str]:
    """{name: installed version} of `roots` and everything they require here."""
    pins: dict[str, str] = {}
    todo = [(r, ()) for r in roots]
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras or ("",)):
            continue
        name = normalise(requirement.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{requirement} is not installed in {sys.prefix}: install .[dev] first")
        seen_extras = pins.get(name, (None, set()))[1] if name in pins else set()
        wanted = set(requirement.extras)
        if name in pins and wanted <= seen_extras:
            continue
        pins[name] = (dist.version, seen_extras | wanted)
        for text in dist.requires or []:
            todo.append((Requirement(text), tuple(sorted(wanted))))
    return {name: version for name, (version, _) in pins.items()}


def main() -> None:
    pins = closure(project_requirements(set(ROOT_EXTRAS)))
    print(f"# The tested set: everything `pip install -e '.[dev]'` installs, at the versions the test suite\n"
          f"# ran with (Python {sys.version_info.major}.{sys.version_info.minor}, Linux x86_64). "
          f"Regenerate: python scripts/freeze_constraints.py > constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
