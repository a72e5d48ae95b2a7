"""The vLLM engine alone, offline: the ceiling that serving (benchmarks/serve_load.py) and batch evaluation
(benchmarks/eval_throughput.py) can reach on this machine, with nothing of ours in the way.

    .venv/bin/python benchmarks/vllm_engine.py [--repeats 2] [--max-tokens 64] [--reserved default 0]
        [--dtypes float32 bfloat16]

Each engine is a fresh process (`vllm.LLM`, the bundled SmolLM2-135M-Instruct, enforce_eager, a 1 GiB
CPU KV cache as our recipes give it) that decodes `--max-tokens` tokens per sequence, end of sequence ignored,
for 1 sequence and then for 32 at once, after a warm-up. `--reserved` compares vLLM's CPU thread layouts:
`default` (vLLM reserves one core for its scheduler process and binds its OpenMP threads to the rest: on 2
cores, one thread) against `VLLM_CPU_NUM_OF_RESERVED_CPU=N`; `--dtypes` compares the weights' precision
(fp32 everywhere; bf16 pays only on CPUs with AVX-512 BF16 / AMX). Every dtype x layout pair is a variant;
they alternate within each repeat, so load from other work hits them alike; the table gives medians and the
ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPTS = [f"Write a short note to a customer about order number {i} and its delivery date." for i in range(32)]


def engine_run(max_tokens: int, dtype: str) -> dict[str, float]:
    """In the child process: tokens/s for 1 and for 32 sequences."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from raytune_app import models

    llm = LLM(models.resolve("bundled:smollm2-135m-instruct"), enforce_eager=True, max_model_len=512, dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)  # warm-up
    rates = {}
    for count in (1, 32):
        began = time.perf_counter()
        llm.generate(PROMPTS[:count], params, use_tqdm=False)
        rates[str(count)] = count * max_tokens / (time.perf_counter() - began)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reserved", nargs="+", default=["default"], help="`default` and / or core counts")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(engine_run(args.max_tokens, args.dtype)), flush=True)
        return
    variants = [(dtype, reserved) for dtype in args.dtypes for reserved in args.reserved]
    results: dict[tuple[str, str], list[dict[str, float]]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for dtype, name in variants:
            env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_NUM_OF_RESERVED_CPU"}
            if name != "default":
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = name
            child = subprocess.run(
                [sys.executable, __file__, "--child", "--max-tokens", str(args.max_tokens), "--dtype", dtype],
                env=env | {"HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
            )
            found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                sys.exit(f"the engine for {dtype}, reserved={name} failed:\n{child.stderr[-3000:]}")
            results[(dtype, name)].append(json.loads(found[0][len("RESULT ") :]))
            said = f"  repeat {repeat + 1}, {dtype}, reserved {name}: {results[(dtype, name)][-1]}"
            print(said, file=sys.stderr, flush=True)
    print(f"\nvLLM engine alone, bundled SmolLM2-135M, {os.cpu_count()} CPUs, {args.max_tokens} tokens a sequence")
    print(f"medians of {args.repeats}\n")
    print(f"{'dtype':<10}{'reserved cores':<16}{'1 seq tok/s':>12}{'x':>6}{'32 seqs tok/s':>15}{'x':>6}")
    base = {n: statistics.median(r[n] for r in results[variants[0]]) for n in ("1", "32")}
    for dtype, name in variants:
        one = statistics.median(r["1"] for r in results[(dtype, name)])
        many = statistics.median(r["32"] for r in results[(dtype, name)])
        print(f"{dtype:<10}{name:<16}{one:>12.1f}{one / base['1']:>6.2f}{many:>15.1f}{many / base['32']:>6.2f}")


if __name__ == "__main__":
    main()
