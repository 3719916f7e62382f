#!/usr/bin/env bash
# Issue 25's GPU measurements as one prepared run on a lent GPU (see docs/performance.md, "Plan for the next GPU
# session"). On the GPU machine, from the repository root, as the device tool's one command:
#
#   bash scripts/device_bench.sh                       # every step in priority order within BUDGET_S seconds
#   STEPS=720p-batch,1080p-batch bash scripts/device_bench.sh
#
# Here, before that call (needs the network; writes ./.whl, which the call carries):
#
#   bash scripts/device_bench.sh wheels                # diffusers, which the GPU image lacks, as a wheel
#
# And on any machine, to try the whole driver first (CPU, tiny model and sizes, no compile, a few minutes):
#
#   DRY_RUN=1 bash scripts/device_bench.sh
#
# Settings (environment): BUDGET_S (default 480, 1200 in a dry run: no step starts and a running one is stopped
# after it; give the device call a timeout of BUDGET_S + 90), STEPS (comma-separated, priority order;
# `python scripts/device_bench.py --list` lists them), OUT (default $OUT, else ./bench-out), PYTHON (default
# python3; .venv/bin/python in a dry run where there is one), SAVE_CACHE=1 (write the compile cache to $OUT
# for a later lease, at most 3 files of 15 MiB),
# CACHE_IN (a folder with an earlier compile-cache.tar.gz[.N]; default ./.bench-cache where it exists),
# DRY_COMPILE=1 (a dry run that really compiles: minutes per compile on a CPU).
# Writes to $OUT: gpu.txt, log.txt, results.json, tables.md (+ compile-cache.tar.gz[.N]): at most 7 files.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "wheels" ]; then
    # the diffusers of this checkout's environment (the GPU image has torch, transformers, safetensors,
    # huggingface_hub and numpy, not diffusers); pure Python, so one wheel for any platform
    PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
    VERSION="$("$PY" -c 'import diffusers; print(diffusers.__version__)')"
    DEST="${WHEEL_DIR:-.whl}"
    mkdir -p "$DEST"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "diffusers==$VERSION"
    if [ "$DEST" = ".whl" ] && [ -d .git/info ]; then
        for path in /.whl/ /.bench-cache/; do
            grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
        done
    fi
    ls -l "$DEST"
    exit 0
fi
if [ $# -gt 0 ]; then
    echo "device_bench.sh: unknown argument '$1' (only 'wheels'; settings are environment variables)" >&2
    exit 2
fi

if [ -n "${DRY_RUN:-}" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY="${PYTHON:-python3}"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# one line instead of a traceback after the machine's start: what is missing, and the fix
"$PY" -c 'import torch, diffusers, torchvision, safetensors, vsstreamdiffvsr' 2> "$OUT/preflight.txt" || {
    echo "device_bench.sh: cannot import what the bench needs ($(tail -n 1 "$OUT/preflight.txt")); on the GPU image," \
         "carry diffusers as a wheel: run 'bash scripts/device_bench.sh wheels' here and name .whl in carry" >&2
    exit 1
}
rm -f "$OUT/preflight.txt"
if [ -z "${DRY_RUN:-}" ]; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true; } \
        | tee "$OUT/gpu.txt"
fi
CACHE_IN="${CACHE_IN:-$( [ -d .bench-cache ] && echo .bench-cache || true )}"
set -o pipefail
BUDGET_S="${BUDGET_S:-$( [ -n "${DRY_RUN:-}" ] && echo 1200 || echo 480 )}"
"$PY" scripts/device_bench.py --out "$OUT" --budget-s "$BUDGET_S" \
    ${DRY_RUN:+--dry-run} ${DRY_COMPILE:+--dry-compile} ${STEPS:+--steps "$STEPS"} \
    ${SAVE_CACHE:+--save-cache} ${CACHE_IN:+--cache-in "$CACHE_IN"} 2>&1 | tee "$OUT/log.txt"
