#!/usr/bin/env bash
# The serving benchmark on one GPU: vLLM backend vs transformers backend vs Ray Serve LLM alone, same weights.
#
#   bash benchmarks/gpu_serve.sh            # on a CUDA machine; ~10 minutes (3 engine starts, 3 repeats)
#
# The model is a ~0.5B-parameter Llama (SmolLM2's tokenizer and chat template, 32 layers of width 1024) built
# locally from a config with random weights: no download, and a random model never stops early, so every
# request decodes exactly --max-tokens tokens on every side. benchmarks/serve_load.py runs the three sides
# interleaved and prints tokens/s, p50 / p99 latency and p50 time to first token at 1, 8 and 32 clients,
# plus the p50 TTFT our ingress + guard + router add over Ray Serve LLM alone. Aims (issue #17): vLLM >= 10x
# the transformers backend's tokens/s at 32 clients; <= 15 ms added TTFT. GUARD=1 trains the default guard
# first (`raytune-app guard train`, a few minutes) so the added TTFT includes the guard call.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh   # CUDA here: installs the CUDA torch and `vllm`
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL_DIR=${MODEL_DIR:-runs/bench-models/llama-0.5b}
OUT=${OUT:-runs/bench-gpu-serve.json}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

.venv/bin/python - "$MODEL_DIR" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raytune_app import models

out = Path(sys.argv[1])
if not (out / "config.json").exists():
    tokenizer = AutoTokenizer.from_pretrained(models.resolve("bundled:smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters into {out}")
PY

if [ "${GUARD:-0}" = 1 ]; then
  .venv/bin/raytune-app guard train --recipe recipes/guard.yaml
fi
.venv/bin/python benchmarks/serve_load.py --gpu --model "$MODEL_DIR" --precision bf16 \
  --sides transformers vllm serve-llm --concurrency 1 8 32 --repeats 3 --max-tokens 128 --out "$OUT"
