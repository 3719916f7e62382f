#!/usr/bin/env bash
# Install vsstreamdiffvsr into ./.venv (Python >= 3.12, found even where `python3.12` is a pyenv shim that
# refuses to run), plus ffmpeg through apt when it is missing and we are root, and point vspipe at the venv.
# Usage: bash scripts/install.sh [EXTRAS]      e.g. bash scripts/install.sh test   or   cluster
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

find_python() {
    local cand
    for cand in "${PYTHON:-}" python3.12 python3.13 python3.14 python3; do
        [ -n "$cand" ] || continue
        if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    # pyenv installs that are not the selected version (the shim refuses them)
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
        if [ -x "$cand" ] && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
    else
        echo "install.sh: ffmpeg and ffprobe are needed: install them (e.g. sudo apt-get install ffmpeg)" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    PY="$(find_python)" || { echo "install.sh: Python >= 3.12 not found (VapourSynth wheels need it); set PYTHON=/path/to/python3.12" >&2; exit 1; }
    # PyPI's Linux torch is the CUDA build: the venv takes about 6 GB, and pip holds the ~3 GB of wheels as well
    # while it installs. Say so up front rather than fail half-way with "No space left on device".
    free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
    if [ "${free_kb:-0}" -lt $((10 * 1024 * 1024)) ]; then
        echo "install.sh: warning: $((free_kb / 1024)) MiB free here; installing torch (CUDA build) needs about 10 GiB" >&2
    fi
    "$PY" -m venv .venv
fi
# --no-cache-dir: a copy of every wheel in ~/.cache would add ~3 GB to the peak for nothing on a fresh machine.
.venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
.venv/bin/python -m pip install -q --no-cache-dir -e ".${extras:+[$extras]}"
.venv/bin/vapoursynth config >/dev/null  # lets vspipe find this venv's Python
