#!/usr/bin/env bash
# PostgreSQL binaries for tests/test_postgres_mlflow.py (the test starts and stops its own server).
# Installs Debian's postgresql when running as root with apt-get; otherwise says how, and the test skips.
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing PostgreSQL for the MLflow-on-PostgreSQL integration test..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
else
  echo "note: PostgreSQL is not installed (sudo apt-get install postgresql); its integration test will skip"
fi
