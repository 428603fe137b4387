#!/usr/bin/env bash
# Installed size of each extra: a fresh venv per extra, `pip install -c constraints.txt '.[EXTRA]'`,
# then the size of the venv (site-packages and scripts). Prints a Markdown table row per extra.
#   bash scripts/extras_sizes.sh [EXTRA ...]     (default: every role; torch ones take minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=("$@")
[ ${#EXTRAS[@]} -gt 0 ] || EXTRAS=(core serve serve,cuda serve,analysis serve,registry train export demo dev)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "| install | MB | seconds | torch | mlflow | scikit-learn |"
echo "|---|---:|---:|---|---|---|"
for extra in "${EXTRAS[@]}"; do
    target=.
    [ "$extra" = core ] || target=".[$extra]"
    python3 -m venv "$WORK/venv"
    started=$SECONDS
    "$WORK/venv/bin/python" -m pip install --quiet -c constraints.txt "$target" >"$WORK/log" 2>&1 \
        || { tail -20 "$WORK/log" >&2; exit 1; }
    seconds=$((SECONDS - started))
    mb=$(du -sm "$WORK/venv" | cut -f1)
    has() { "$WORK/venv/bin/python" -m pip show --quiet "$1" >/dev/null 2>&1 && echo yes || echo no; }
    echo "| \`vae-pipeline${target#.}\` | $mb | $seconds | $(has torch) | $(has mlflow) | $(has scikit-learn) |"
    rm -rf "$WORK/venv"
done
