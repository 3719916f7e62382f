#!/usr/bin/env bash
# Install vsstreamdiffvsr with its test extra into ./.venv (scripts/install.sh) and run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
