#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the default test suite (CPU; GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_DEDUP_LOGS=0
exec .venv/bin/python -m pytest "$@"
