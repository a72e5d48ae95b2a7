#!/usr/bin/env bash
# The GPU check on a machine with no package registry (an air-gapped cluster node, a rented GPU box behind a
# firewall) whose image already holds CUDA PyTorch, transformers, peft and accelerate: pack a wheelhouse here,
# carry it there, install it beside the image's torch and run benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_offline.sh pack .whl          # here, with PyPI: ~58 MB (Python 3.12, CUDA 13 by default)
#   bash benchmarks/gpu_offline.sh run .whl           # there, in a copy of this repository: ~10 min on an H200
#
# PY=3.11 / CUDA=cuda128 pack for another image. What is left out to keep the wheelhouse small (it ran on an
# H200 this way, BENCHMARKS.md "GPU path"): Ray's Java jar, dashboard web client and RLlib (not used here),
# bitsandbytes' kernels for other CUDA and ROCm versions, MLflow (tracking is skipped and says so), and vLLM,
# whose wheel (336 MB) pins its own torch: the serving benchmark needs an image with vLLM (gpu_serve.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?pack or run}
wheels=${2:-.whl}
PY=${PY:-3.12}
CUDA=${CUDA:-cuda13}

if [ "$mode" = pack ]; then
  py=.venv/bin/python
  mkdir -p "$wheels"
  platforms=()
  for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$p")
  done
  # Pinned to this checkout's .venv where it has the package, so the GPU runs what the CPU tests ran.
  specs=(ray==2.60.0)
  for name in trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection jsonschema \
    jsonschema-specifications referencing rpds-py colorful sniffio peft tensorboardX bitsandbytes liger-kernel; do
    version=$($py -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}' || true)
    specs+=("$name${version:+==$version}")
  done
  for spec in "${specs[@]}"; do
    $py -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
      "${platforms[@]}" -d "$wheels" "$spec"
  done
  $py - "$wheels" "$CUDA" <<'PY'
import os
import sys
import zipfile
from pathlib import Path

wheels, cuda = Path(sys.argv[1]), sys.argv[2]


def strip(wheel: Path, drop) -> None:
    """Rewrite a wheel without the files `drop` names (and without their RECORD lines)."""
    kept = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as target:
        removed = {i.filename for i in source.infolist() if drop(i.filename)}
        for info in source.infolist():
            if info.filename in removed:
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "".join(line + "\n" for line in lines if line.split(",")[0] not in removed).encode()
            target.writestr(info, data)  # the ZipInfo keeps the executable bits (raylet, gcs_server)
    os.replace(kept, wheel)
    print(f"{wheel.name}: {len(removed)} files left out, {wheel.stat().st_size / 1e6:.0f} MB")


for wheel in wheels.glob("ray-*.whl"):
    strip(wheel, lambda f: f.startswith(("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")))
for wheel in wheels.glob("bitsandbytes-*.whl"):
    strip(wheel, lambda f: f.startswith("bitsandbytes/libbitsandbytes_") and not (cuda in f or "cpu" in f))
PY
  HF_HUB_OFFLINE=1 $py -c "
import sys
from transformers import AutoTokenizer
from raytune_app import models
AutoTokenizer.from_pretrained(models.resolve('bundled:smollm2-135m-instruct')).save_pretrained(sys.argv[1])
" "$wheels/tokenizer"
  du -sh "$wheels"
  exit 0
fi

[ "$mode" = run ] || { echo "gpu_offline: pack or run, not $mode"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
site=${SITE:-/tmp/raytune-site}
[ -d "$site/ray" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
# The image's torch stays; the carried packages come first on the path, for the driver and every Ray worker.
export PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "
import torch, transformers, peft, trl, datasets, ray, bitsandbytes, pydantic
print(*(f'{m.__name__} {m.__version__}' for m in (torch, transformers, peft, trl, datasets, ray, bitsandbytes)))
import raytune_app.train.run, raytune_app.tune.run, raytune_app.data.prepare
"
python3 benchmarks/gpu_check.py --tokenizer "$wheels/tokenizer" --fail-fast ${GPU_CHECK_ARGS:-}
