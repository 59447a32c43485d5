#!/usr/bin/env bash
# Makes a virtualenv with Mooncake's Transfer Engine (non-CUDA wheel, from PyPI) and the Debian
# libraries its engine.so needs but the wheel does not ship (libibverbs1 and libnl), unpacked
# without installing them system-wide. Used by benchmarks/transfer_engine.py; not a dependency
# of memstore. Usage: scripts/get_mooncake.sh [PREFIX]   (default PREFIX: ~/.cache/memstore-mooncake)
# Then:  . PREFIX/env.sh && PYTHONPATH=$PWD "$MOONCAKE_PYTHON" -m benchmarks.transfer_engine
set -euo pipefail

PREFIX=$(realpath -m "${1:-$HOME/.cache/memstore-mooncake}")
PYTHON=${PYTHON:-python3.11}   # the wheel is built for CPython 3.8-3.13 on x86_64
MOONCAKE=${MOONCAKE:-mooncake-transfer-engine-non-cuda==0.3.13.post1}
NUMPY=${NUMPY:-numpy==2.4.6}
# Debian bookworm's versions; other releases: set DEBS to names without "=version".
DEBS=${DEBS:-"libibverbs1=44.0-2 libnl-3-200=3.7.0-0.2+b1 libnl-route-3-200=3.7.0-0.2+b1"}

mkdir -p "$PREFIX/debs" "$PREFIX/deps"
"$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet "$NUMPY" "$MOONCAKE"

cd "$PREFIX/debs"
# apt-get download runs as _apt where it can; a root-owned folder only gets a warning.
# shellcheck disable=SC2086
apt-get download $DEBS || {
    echo "apt-get download failed: run 'apt-get update' first, or set DEBS to this release's names" >&2
    exit 1
}
for deb in "$PREFIX"/debs/*.deb; do dpkg-deb -x "$deb" "$PREFIX/deps"; done

cat >"$PREFIX/env.sh" <<EOF
export LD_LIBRARY_PATH="$PREFIX/deps/usr/lib/x86_64-linux-gnu:$PREFIX/deps/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export MOONCAKE_PYTHON="$PREFIX/venv/bin/python"
EOF
# shellcheck disable=SC1091
. "$PREFIX/env.sh"
"$MOONCAKE_PYTHON" -c "from mooncake.engine import TransferEngine; print('mooncake.engine imports')"
"$PREFIX/venv/bin/pip" list --format=freeze 2>/dev/null | grep -iE '^(mooncake|numpy)'
for deb in "$PREFIX"/debs/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done
