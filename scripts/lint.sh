#!/usr/bin/env bash
# Lint, format and type checks (run by scripts/test.sh before the tests, so CI runs them too; also the
# pre-commit hooks). Needs the venv of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
