#!/usr/bin/env bash
# Run the tunneld benchmark (see bench/bench.py): `make bench` or `bash bench/run.sh [--quick] [--duration N]`.
# Ensures wrk is installed (apt-get, when root) or falls back to bench.py's Python load generator,
# then runs bench.py with the dev venv's python when .venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=()
if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: wrk missing, installing it with apt-get" >&2
        timeout 300 apt-get install -y wrk >/dev/null 2>&1 \
            || { timeout 300 apt-get update >/dev/null 2>&1 && timeout 300 apt-get install -y wrk >/dev/null 2>&1; } \
            || true
    fi
    if ! command -v wrk >/dev/null 2>&1; then
        echo "bench: wrk unavailable, using the built-in Python load generator" >&2
        extra+=(--no-wrk)
    fi
fi

venv=${VENV:-.venv}
if [ -x "$venv/bin/python" ]; then
    py=$venv/bin/python
else
    py=${PYTHON:-python3}
fi
# exec: bench.py itself stops (by PID) every process it started, on exit, error, SIGINT or SIGTERM.
exec "$py" bench/bench.py ${extra[@]+"${extra[@]}"} "$@"
