"""`vae STAGE ...`: one console script for every stage (`vae train ...` runs `python -m train ...`).

    vae --version        the version, and where this copy is installed
    vae doctor           where each stage is imported from, which extras are installed

The stages are top-level packages named `pipeline`, `train`, `export` and `serve`, names that other
PyPI projects use too. This file sits beside them (in the checkout and in site-packages), so it can
tell ours from a same-named package that shadows or overwrites them; that is what `doctor` checks,
and the stages are only run when they resolve to ours. Nothing here imports a stage package before
that check.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DISTRIBUTION = "vae-pipeline"
STAGES = {  # stage: (what it does, the extra it needs, None for the core)
    "pipeline": ("write, verify and inspect WebDataset shards", None),
    "train": ("train the VAE (use `torchrun ... -m train` for several processes)", "train"),
    "export": ("export a checkpoint to verified ONNX; TensorRT, Triton, MLflow registry", "export"),
    "serve": ("generate, encode, score and serve over HTTP from the ONNX files", "serve"),
}


def _load_ours(name: str):
    """Our pipeline/cli.py (stdlib only), loaded by path so a shadowing `pipeline` cannot stand in."""
    spec = importlib.util.spec_from_file_location(f"_vae_{name}", HERE / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_ours("cli")


def version() -> str:
    """pipeline.__version__, the one place the version is kept (pyproject.toml reads it too)."""
    text = (HERE / "pipeline" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def usage() -> str:
    lines = [f"usage: vae {{{','.join(STAGES)}}} ...  |  vae doctor  |  vae --version", "",
             "One command line for the VAE pipeline; `vae STAGE --help` lists a stage's subcommands and flags.", ""]
    lines += [f"  {name:<9} {text}" for name, (text, _) in STAGES.items()]
    lines += [f"  {'doctor':<9} where each stage is imported from, which extras are installed", "",
              "exit codes (every stage): " + ", ".join(f"{code} {text}" for code, text in CLI.EXIT_CODES.items())]
    return "\n".join(lines)


def stage_origin(stage: str) -> Path | None:
    """The directory `import STAGE` would load, without importing it."""
    spec = importlib.util.find_spec(stage)
    if spec is None:
        return None
    return Path(spec.origin).resolve().parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))


def other_owners(stage: str) -> list[str]:
    """Installed distributions other than ours that put files under a top-level `stage`."""
    owners = importlib.metadata.packages_distributions().get(stage, [])
    return sorted({name for name in owners if re.sub(r"[-_.]+", "-", name).lower() != DISTRIBUTION})


def stage_problem(stage: str) -> str | None:
    """Why `import STAGE` would not give vae-pipeline's stage, or None when it does."""
    origin = stage_origin(stage)
    if origin != HERE / stage:
        return (f"`import {stage}` loads {origin or 'nothing'}, not vae-pipeline's {HERE / stage}: another "
                f"package named {stage!r} comes first on sys.path")
    others = other_owners(stage)
    if others:
        return (f"{', '.join(others)} also install(s) files into {origin}: same-named packages overwrite each "
                f"other; install vae-pipeline in a virtualenv of its own")
    return None


def doctor() -> int:
    print(f"{DISTRIBUTION} {version()} from {HERE}")
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    problems = 0
    for stage in STAGES:
        problem = stage_problem(stage)
        problems += problem is not None
        print(f"  {stage:<9} {stage_origin(stage) or '-'}  {'CLASH: ' + problem if problem else 'ok'}")
    for extra in CLI.EXTRA_MODULES:
        missing = CLI.missing_modules(extra)
        state = "installed" if not missing else f"missing {', '.join(missing)} ({CLI.install_hint(extra)})"
        print(f"  [{extra}] {state}")
    for name in ("numpy", "onnxruntime-gpu", "onnxruntime", "torch", "mlflow", "mlflow-skinny"):
        try:
            print(f"  {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    if problems:
        print(f"{problems} stage(s) do not resolve to vae-pipeline's own: see README, 'Installing'", file=sys.stderr)
    return CLI.EXIT_FAILURE if problems else CLI.EXIT_OK


def run_stage(stage: str, argv: list[str]) -> int:
    problem = stage_problem(stage)
    if problem:
        print(f"vae {stage}: {problem} (`vae doctor` shows all stages)", file=sys.stderr)
        return CLI.EXIT_FAILURE
    extra = STAGES[stage][1]
    missing = CLI.missing_modules(extra) if extra else []
    if missing:
        print(f"vae {stage} needs {', '.join(missing)}, which the [{extra}] extra brings: {CLI.install_hint(extra)}",
              file=sys.stderr)
        return CLI.EXIT_FAILURE
    sys.argv = [f"vae {stage}", *argv]
    runpy.run_module(stage, run_name="__main__", alter_sys=True)  # the stage calls sys.exit(main())
    return CLI.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return CLI.EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(usage())
        return CLI.EXIT_OK
    if command in ("-V", "--version"):
        print(f"{DISTRIBUTION} {version()}")
        return CLI.EXIT_OK
    if command == "doctor":
        return doctor()
    if command not in STAGES:
        print(f"{usage()}\n\nvae: unknown command {command!r}", file=sys.stderr)
        return CLI.EXIT_USAGE
    return run_stage(command, rest)


if __name__ == "__main__":
    sys.exit(main())
