#!/usr/bin/env bash
# Real text for the traffic analysis and the model: plain UTF-8 text, English and Chinese, from
# Debian's documentation packages (downloaded with apt-get from the Debian archive, unpacked with
# dpkg-deb, converted by model/realtext.py).
#
#   scripts/get_text.sh [OUT_DIR]      (default: $TEXT_DIR, else data/text)
#
# Writes OUT_DIR/en/{linux-doc,python-doc,debian-handbook}.txt and
# OUT_DIR/zh/{debian-handbook,linux-doc}.txt. The .deb files are kept in $DEB_CACHE (default
# data/debs) and unpacked once; a second run downloads nothing and only rewrites the text.
# Needs apt-get (Debian or Ubuntu with the Debian packages' names: linux-doc-6.1, python3.11-doc,
# debian-handbook) and about 85 MB download, 360 MB unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${TEXT_DIR:-data/text}}
CACHE=${DEB_CACHE:-data/debs}
PACKAGES=(linux-doc-6.1 python3.11-doc debian-handbook)
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

mkdir -p "$CACHE/unpacked"
for pkg in "${PACKAGES[@]}"; do
    if ! compgen -G "$CACHE/${pkg}_*.deb" >/dev/null; then
        for tool in apt-get dpkg-deb; do
            command -v "$tool" >/dev/null || { echo "get_text.sh needs $tool (a Debian-based system)" >&2; exit 1; }
        done
        echo "downloading $pkg"
        # apt-get download writes into the current directory.
        if ! (cd "$CACHE" && apt-get download "$pkg"); then
            echo "could not download $pkg: run 'apt-get update' (as root) and retry, or put its .deb in $CACHE" >&2
            exit 1
        fi
    fi
    deb=$(ls "$CACHE/${pkg}"_*.deb | sort | tail -n 1)
    stamp="$CACHE/unpacked/.$(basename "$deb").done"
    if [ ! -e "$stamp" ]; then
        echo "unpacking $(basename "$deb")"
        dpkg-deb -x "$deb" "$CACHE/unpacked"
        touch "$stamp"
    fi
done

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m model.realtext debian --unpacked "$CACHE/unpacked" --out "$OUT"
echo "text in $OUT"
