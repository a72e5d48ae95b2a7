"""The vLLM engine alone, offline: the ceiling that serving (benchmarks/serve_load.py) and batch evaluation
(benchmarks/eval_throughput.py) can reach on this machine, with nothing of ours in the way.

    .venv/bin/python benchmarks/vllm_engine.py [--repeats 2] [--max-tokens 64] [--reserved default 0 in-process]
        [--dtypes float32 bfloat16]

Each engine is a fresh process running vLLM's AsyncLLM as `ray.data.llm` runs it (the single-process executor
asked for; the bundled SmolLM2-135M-Instruct, enforce_eager, a 1 GiB CPU KV cache as our recipes give it): the
time to start it, then `--max-tokens` tokens per sequence, end of sequence ignored, for 1 sequence and then for
32 at once, after a warm-up. `--reserved` compares vLLM's CPU layouts: `default` (vLLM's CPU build swaps the
executor for a spawned worker process, reserves one core for its scheduler and binds its OpenMP threads to the
rest: on 2 cores, one thread), `VLLM_CPU_NUM_OF_RESERVED_CPU=N`, and `in-process` (V1 multiprocessing off: the
model runs in the engine-core process, one thread per core Ray gives it: what the batch stages and serving use
on a CPU, models.vllm_cpu_single_process_env). `--dtypes` compares the weights' precision (fp32 everywhere; bf16
pays only on CPUs with AVX-512 BF16 / AMX). Every dtype x layout pair is a variant; they alternate within each
repeat, so load from other work hits them alike; the table gives medians and the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from raytune_app import models

PROMPTS = [f"Write a short note to a customer about order number {i} and its delivery date." for i in range(32)]


def engine_run(max_tokens: int, dtype: str) -> dict[str, float]:
    """In the child process: seconds to start the engine, tokens/s for 1 and for 32 sequences."""
    import asyncio

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams

    began = time.perf_counter()
    args = AsyncEngineArgs(
        model=models.resolve("bundled:smollm2-135m-instruct"),
        enforce_eager=True,
        max_model_len=512,
        dtype=dtype,
        distributed_executor_backend="uni",  # what ray.data.llm asks for on one device
    )
    engine = AsyncLLMEngine.from_engine_args(args)
    started = time.perf_counter() - began
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def generate(prompts: list[str]) -> None:
        async def one(i: int, prompt: str) -> None:
            async for _ in engine.generate(prompt, params, request_id=f"{time.perf_counter()}-{i}"):
                pass

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    async def measure() -> dict[str, float]:
        await generate(PROMPTS[:2])  # warm-up
        rates = {"start_s": started}
        for count in (1, 32):
            began = time.perf_counter()
            await generate(PROMPTS[:count])
            rates[str(count)] = count * max_tokens / (time.perf_counter() - began)
        return rates

    try:
        return asyncio.run(measure())
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--reserved", nargs="+", default=["default"], help="`default`, core counts and / or `in-process`"
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(engine_run(args.max_tokens, args.dtype)), flush=True)
        return
    variants = [(dtype, reserved) for dtype in args.dtypes for reserved in args.reserved]
    results: dict[tuple[str, str], list[dict[str, float]]] = {variant: [] for variant in variants}
    layout_vars = ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")
    for repeat in range(args.repeats):
        for dtype, name in variants:
            env = {k: v for k, v in os.environ.items() if k not in layout_vars}
            if name == "in-process":  # the evaluate stage's bundle of a one-replica run: all cores but half a one
                env |= models.vllm_cpu_single_process_env((os.cpu_count() or 1) - 0.5, 1)
            elif name != "default":
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
    cpus, tokens = os.cpu_count(), args.max_tokens
    print(f"\nvLLM engine alone (AsyncLLM), bundled SmolLM2-135M, {cpus} CPUs, {tokens} tokens a sequence")
    print(f"medians of {args.repeats}\n")
    print(f"{'dtype':<10}{'layout':<12}{'start s':>9}{'x':>6}{'1 seq tok/s':>13}{'x':>6}{'32 seqs tok/s':>15}{'x':>6}")
    keys = ("start_s", "1", "32")
    base = {n: statistics.median(r[n] for r in results[variants[0]]) for n in keys}
    for dtype, name in variants:
        start, one, many = (statistics.median(r[n] for r in results[(dtype, name)]) for n in keys)
        print(
            f"{dtype:<10}{name:<12}{start:>9.1f}{start / base['start_s']:>6.2f}{one:>13.1f}{one / base['1']:>6.2f}"
            f"{many:>15.1f}{many / base['32']:>6.2f}"
        )


if __name__ == "__main__":
    main()
