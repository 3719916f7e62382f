#!/usr/bin/env bash
# The GPU benchmark as one prepared run (for a session lent a GPU through the device tool).
#
# Wheels missing on the GPU image (diffusers, huggingface_hub, safetensors, ... ; see the device tool's
# notes) travel in ./.whl (git-ignored via .git/info/exclude) and are installed to /tmp/site first.
# Results land in $OUT (or ./bench-out): the markdown tables for the README and the JSON behind them.
#
#   bash scripts/device_bench.sh            # 720p + 1080p, reference vs bf16 eager vs bf16 compiled, 4K tiled
#   QUICK=1 bash scripts/device_bench.sh    # 720p only (fits a short device lease)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
FRAMES="${FRAMES:-24}"
PY="${PYTHON:-python3}"
bench() { "$PY" scripts/bench.py --device "$DEVICE" --frames "$FRAMES" "$@"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } | tee "$OUT/gpu.txt"
bench --lr 320x180 --json "$OUT/720p.json" | tee "$OUT/720p.md"
bench --lr 320x180 --compile --skip-reference --json "$OUT/720p-compiled.json" | tee "$OUT/720p-compiled.md"
bench --lr 320x180 --vae-dtype bfloat16 --json "$OUT/720p-vae-bf16.json" | tee "$OUT/720p-vae-bf16.md"
[ -n "${QUICK:-}" ] && exit 0
bench --lr 480x270 --json "$OUT/1080p.json" | tee "$OUT/1080p.md"
bench --lr 480x270 --compile --skip-reference --json "$OUT/1080p-compiled.json" | tee "$OUT/1080p-compiled.md"
bench --lr 960x540 --tile 192 --frames 6 --warmup 2 --skip-reference --json "$OUT/4k-tiled.json" | tee "$OUT/4k-tiled.md"
