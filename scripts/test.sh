#!/usr/bin/env bash
# Sets up (scripts/setup.sh), checks lint, format and types (scripts/lint.sh), then runs the test suite
# (CPU; GPU tests skip without a GPU). Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the
# fast lane. RAYTUNE_SKIP_LINT=1 skips the checks (CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${RAYTUNE_SKIP_LINT:-0}" = 1 ] || bash scripts/lint.sh
export HF_HUB_OFFLINE=1 RAY_DEDUP_LOGS=0
exec .venv/bin/python -m pytest "$@"
