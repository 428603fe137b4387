"""The one-way import rule (pipeline -> train -> export -> serve), read from the source with ast."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ORDER = ["pipeline", "train", "export", "serve"]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_flow_one_way():
    problems = []
    for position, package in enumerate(ORDER):
        allowed_left = set(ORDER[: position + 1])
        for path in (REPO / package).rglob("*.py"):
            for name in imported_packages(path) & set(ORDER):
                if name not in allowed_left:
                    problems.append(f"{path.relative_to(REPO)} imports {name}")
    assert problems == []


def test_serve_never_imports_torch():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "serve").rglob("*.py")
                 if "torch" in imported_packages(p)]
    assert offenders == []
    code = "import sys, serve.__main__, serve.runtime; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_model_import_stays_light():
    code = "import sys, train.model; print(sorted(m for m in ('mlflow', 'torch.distributed.run', 'webdataset') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_the_model_card_file_is_named_in_one_place():
    """model.json's name is a string in export/model_card.py alone; everything else reads it through that module."""
    spelled = [str(path.relative_to(REPO)) for package in ORDER + ["bench", "scripts"]
               for path in (REPO / package).rglob("*.py")
               if any(isinstance(node, ast.Constant) and node.value == "model.json"
                      for node in ast.walk(ast.parse(path.read_text())))]
    assert spelled == ["export/model_card.py"]
