#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: create a table, serve it, use it, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"
