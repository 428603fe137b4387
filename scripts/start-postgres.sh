#!/usr/bin/env bash
# Start a throwaway PostgreSQL (Debian's `postgresql` package) for MLflow, as a cluster's database
# would be, listening on 127.0.0.1 only:
#   scripts/start-postgres.sh DATADIR PORT [PASSWORD]    (stop it: scripts/stop-postgres.sh DATADIR)
# Creates role and database `mlflow` (password PASSWORD, default "mlflow"; scram-sha-256 over TCP)
# and prints the MLflow backend URI. Run as root, it runs the server as the `postgres` user (initdb
# refuses root). PG_BIN overrides where initdb and pg_ctl are (default: the newest
# /usr/lib/postgresql/*/bin, else PATH).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 DATADIR PORT [PASSWORD]" >&2
  exit 2
fi
DATADIR=$(realpath -m "$1")
PORT=$2
PASSWORD=${3:-mlflow}
if [[ ! $PASSWORD =~ ^[A-Za-z0-9._~-]+$ ]]; then
  echo "error: the password goes into a URI unquoted; use letters, digits and ._~- only" >&2
  exit 2
fi
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [[ -n $PG_BIN ]]; then PATH="$PG_BIN:$PATH"; fi
if ! command -v initdb >/dev/null || ! command -v pg_ctl >/dev/null; then
  echo "error: PostgreSQL server binaries not found (apt-get install -y postgresql)" >&2
  exit 3
fi

as_owner() {  # run a command as the cluster's owner
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- env PATH="$PATH" "$@"; else "$@"; fi
}

mkdir -p "$DATADIR"
chmod 700 "$DATADIR"
if [[ $(id -u) -eq 0 ]]; then
  chown postgres:postgres "$DATADIR"
  if ! runuser -u postgres -- test -x "$DATADIR"; then
    echo "error: the postgres user cannot reach $DATADIR: make its parent directories traversable" >&2
    exit 1
  fi
fi
if [[ ! -f $DATADIR/PG_VERSION ]]; then
  as_owner initdb --pgdata="$DATADIR" --username=postgres --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >"$DATADIR.initdb.log" 2>&1 \
    || { cat "$DATADIR.initdb.log" >&2; exit 1; }
fi
# The socket lives in the data directory: /var/run/postgresql may not be writable or may not exist.
if ! as_owner pg_ctl --pgdata="$DATADIR" status >/dev/null 2>&1; then
  as_owner pg_ctl --pgdata="$DATADIR" --log="$DATADIR/server.log" --wait --timeout=60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATADIR" start >/dev/null \
    || { cat "$DATADIR/server.log" >&2; exit 1; }
fi
psql_local() { as_owner psql --no-psqlrc --quiet -v ON_ERROR_STOP=1 -h "$DATADIR" -p "$PORT" -U postgres "$@"; }
if [[ $(psql_local -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'") != 1 ]]; then
  psql_local -c "CREATE ROLE mlflow LOGIN PASSWORD '$PASSWORD'"
  psql_local -c "CREATE DATABASE mlflow OWNER mlflow"
fi
echo "postgresql+psycopg2://mlflow:$PASSWORD@127.0.0.1:$PORT/mlflow"
