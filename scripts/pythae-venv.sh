#!/usr/bin/env bash
# A separate virtualenv for the pythae peer of bench/fmnist_quality.py (PyPI pythae 0.1.2).
# pythae is a benchmark peer, not a dependency of the project: it stays out of the shared venv and
# pyproject.toml. The new venv sees the base venv's packages through a .pth file (torch, numpy,
# pydantic 2, scipy, scikit-learn, tqdm), so pip installs only pythae and the two small packages it
# adds (--no-deps: otherwise pip would fetch a second torch, 5 GB; `venv --system-site-packages`
# would not help, it points at the system Python, not at the base venv).
#   scripts/pythae-venv.sh [BASE_VENV=.venv] [TARGET=.venv-pythae]
set -euo pipefail
base=$(cd "${1:-.venv}" && pwd)
target=${2:-.venv-pythae}
python3_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$base/bin/python" -m venv "$target"
target_site=$("$target/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$python3_site" > "$target_site/base-venv.pth"
"$target/bin/python" -m pip install --quiet --no-deps 'pythae==0.1.2' 'cloudpickle>=2.1' imageio
"$target/bin/python" -c "import pythae, torch; print('pythae ok; torch', torch.__version__, 'from', torch.__file__)"
