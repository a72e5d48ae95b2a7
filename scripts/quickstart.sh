#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the quickstart pipeline on CPU with the bundled SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/raytune-app run --recipe recipes/quickstart.yaml "$@"
