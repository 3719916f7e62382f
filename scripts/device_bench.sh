#!/usr/bin/env bash
# The GPU benchmark as one prepared run (for a session lent a GPU through the device tool).
#
# Wheels missing on the GPU image (diffusers, importlib_metadata; see the device tool's notes) travel in
# ./.whl (git-ignored via .git/info/exclude) and are installed to /tmp/site first. Results land in $OUT
# (or ./bench-out): tables.md for the README, results.json behind it, log.txt. BUDGET_S (default 520)
# bounds the run: steps that would not fit are skipped and listed; STEPS picks and orders them.
#
#   bash scripts/device_bench.sh
#   PYTHON=.venv/bin/python DEVICE=cpu TINY=1 bash scripts/device_bench.sh   # dry run on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true; } | tee "$OUT/gpu.txt"
"$PY" scripts/device_bench.py --device "${DEVICE:-cuda}" --out "$OUT" --budget-s "${BUDGET_S:-520}" \
    --frames "${FRAMES:-24}" ${TINY:+--tiny} ${STEPS:+--steps "$STEPS"} 2>&1 | tee "$OUT/log.txt"
