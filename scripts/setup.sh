#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its pinned dev dependencies.
# Idempotent: a second run only checks that everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch==2.13.0 is pinned first: it resolves to the CPU build on this machine's disk,
# where a looser spec would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
# A real etcd (Debian etcd-server 3.4) for clusters on etcd and their tests; they skip without it.
scripts/get_etcd.sh || echo "etcd not installed (see the message above): the etcd tests will skip" >&2
