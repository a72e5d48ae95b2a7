#!/usr/bin/env bash
# The GPU path in one command (about 8 minutes on one H100 / H200): set up with the CUDA builds, then
#   (1) training throughput: LoRA and QLoRA, padded vs packed + flash kernels, with and without Liger;
#   (2) a 1-GPU Ray Tune search of 4 short trials;            -> benchmarks/gpu_check.py
#   (3) serving: vLLM vs transformers backends at 1 / 8 / 32 clients (benchmarks/gpu_serve.sh, where present).
# The results table goes to stdout and runs/gpu_check/gpu_check.json; copy it into BENCHMARKS.md.
# Optional kernels (flash-attn, liger-kernel) are installed when a package registry is reachable; without
# them the variants that ask for them report the missing package and the others run.
#   GPU_CHECK_ARGS="--steps 50"  bash benchmarks/gpu_check.sh     # shorter
#   bash benchmarks/gpu_check.sh --dry-run                         # anywhere: build and validate only
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here (use --dry-run)"; exit 2; }
  [ -x .venv/bin/python ] || TORCH_SPEC=torch bash scripts/setup.sh || {
    echo "gpu_check: setup failed; on a machine without a package registry whose image has CUDA PyTorch, use"
    echo "  bash benchmarks/gpu_offline.sh pack .whl   (where pip works), then: bash benchmarks/gpu_offline.sh run .whl"
    exit 3
  }
  for pkg in liger-kernel flash-attn; do
    mod=${pkg//-/_}
    .venv/bin/python -c "import ${mod}" 2>/dev/null && continue
    timeout 300 .venv/bin/python -m pip install -q "$pkg" --no-build-isolation 2>/dev/null \
      || echo "gpu_check: $pkg not installed (no registry, or no wheel for this torch): its variants will say so"
  done
fi
.venv/bin/python benchmarks/gpu_check.py "$@" ${GPU_CHECK_ARGS:-}
if [ "${1:-}" != "--dry-run" ] && [ -f benchmarks/gpu_serve.sh ]; then
  bash benchmarks/gpu_serve.sh
fi
