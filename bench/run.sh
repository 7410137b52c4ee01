#!/usr/bin/env bash
# Run the tunneld benchmark (bench/compare.py): `make bench` or `bash bench/run.sh [--quick] [--duration N] ...`.
# Installs what the comparison needs when it is missing and this runs as root with apt-get: wrk (else
# compare.py falls back to its Python load generator for the small GETs) and openssh-server/openssh-client
# (else the ssh -R column is skipped, with the reason in the output), nodejs and npm (the gRPC peers). Then runs compare.py with the dev
# venv's python ($VENV, default .venv) when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)   # the HTTP/2 row
{ command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; } || missing+=(openssh-server)
{ command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; } || missing+=(openssh-client)
# node + npm for the gRPC peers (grpc-js); without them the gRPC rows use Python's grpc.aio, said in the output.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing ${missing[*]} with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        timeout 300 apt-get install -y "${missing[@]}" >/dev/null 2>&1 \
            || { timeout 300 apt-get update >/dev/null 2>&1 \
                 && timeout 300 apt-get install -y "${missing[@]}" >/dev/null 2>&1; } \
            || echo "bench: apt-get could not install ${missing[*]}" >&2
    else
        echo "bench: ${missing[*]} missing (not root or no apt-get): not installing" >&2
    fi
fi

extra=()
if ! command -v wrk >/dev/null 2>&1; then
    echo "bench: wrk unavailable, using the built-in Python load generator" >&2
    extra+=(--no-wrk)
fi

venv=${VENV:-.venv}
if [ -x "$venv/bin/python" ]; then
    py=$venv/bin/python
else
    py=${PYTHON:-python3}
fi
# exec: compare.py itself stops (by PID) every process it started, on exit, error, SIGINT or SIGTERM.
exec "$py" bench/compare.py ${extra[@]+"${extra[@]}"} "$@"
