#!/usr/bin/env bash
# Stop a PostgreSQL started by scripts/start-postgres.sh DATADIR (fast shutdown; data kept).
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "usage: $0 DATADIR" >&2
  exit 2
fi
DATADIR=$(realpath -m "$1")
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [[ -n $PG_BIN ]]; then PATH="$PG_BIN:$PATH"; fi
if [[ ! -f $DATADIR/postmaster.pid ]]; then
  exit 0  # not running
fi
if [[ $(id -u) -eq 0 ]]; then
  runuser -u postgres -- env PATH="$PATH" pg_ctl --pgdata="$DATADIR" --mode=fast --wait stop >/dev/null
else
  pg_ctl --pgdata="$DATADIR" --mode=fast --wait stop >/dev/null
fi
