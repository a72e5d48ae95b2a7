"""Batch evaluation throughput: the evaluate stage on vLLM (`ray.data.llm`) and on transformers, against a
one-at-a-time loop.

    .venv/bin/python benchmarks/eval_throughput.py --examples 48 --repeats 3 [--adapter runs/quickstart/train/adapter]
        [--sides loop transformers transformers-2 vllm]

    loop            a plain loop in one process: for each example, render the chat template, `generate` with
                    batch 1, decode -- what a user writes first (the baseline);
    transformers    the evaluate stage with evaluate.backend=transformers: a Ray Data actor pool (1 replica on
                    all cores), batches of `--batch-size` length-sorted prompts, left padding;
    transformers-2  the same with 2 replicas of 1 core each;
    vllm            the evaluate stage with evaluate.backend=vllm: Ray Data's vLLM processor, one engine
                    (continuous batching; the adapter, when given, as a vLLM LoRA request).

Same model and weights (the bundled SmolLM2-135M-Instruct, plus `--adapter` when given), same examples (the
quickstart task's prepared split), greedy decoding, the same `max_new_tokens` and precision (`--precision`;
`auto`: bf16 on a CPU with native bf16 -- AVX-512 BF16 / AMX -- else fp32, which vLLM would fall back to
anyway). Examples/s counts the whole generation (model and engine load excluded: each side loads once);
generated tokens are counted up to the end-of-turn token. Each run is a fresh subprocess, and the sides take
turns within each repeat (a shared machine's load hits them alike); the replies are compared with the loop's
(greedy decoding should give the same text).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import run_measured, start_ray  # noqa: E402


def recipe_for(
    out: str, examples: int, batch_size: int, replicas: int, max_new_tokens: int, backend: str, precision: str
):
    from raytune_app import config

    return config.load(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={out}",
            f"data.generator.rows={examples * 4}",
            "data.split.val=0.0",
            "data.split.test=0.25",
            f"train.precision={precision}",
            f"evaluate.limit={examples}",
            f"evaluate.batch_size={batch_size}",
            f"evaluate.replicas={replicas}",
            f"evaluate.max_new_tokens={max_new_tokens}",
            f"evaluate.backend={backend}",
        ],
    )


def examples_of(recipe):
    """Prepare the data (a Ray job of its own) and return the evaluation examples."""
    from raytune_app.data.prepare import prepare
    from raytune_app.evaluate.run import prepared_examples

    prepare(recipe)
    examples, _ = prepared_examples(recipe)
    return examples.slice(0, recipe.evaluate.limit)


def run_loop(recipe, adapter: str | None) -> dict:
    import ray
    import torch

    from raytune_app.evaluate.generation import Generator

    start_ray()
    examples = examples_of(recipe)
    ray.shutdown()
    torch.set_num_threads(os.cpu_count())
    model = recipe.model.model_dump(include={"path", "tokenizer", "chat_template", "trust_remote_code"})
    # The generator's model loading and stop tokens, called one example at a time.
    one = Generator(
        model, adapter, recipe.evaluate.max_new_tokens, dtype=recipe.train.precision, threads=os.cpu_count()
    )
    replies, tokens = {}, 0
    started = time.time()
    for i in range(examples.num_rows):
        row = one(examples.slice(i, 1))
        replies[row.column("example")[0].as_py()] = row.column("prediction")[0].as_py()
        tokens += row.column("new_tokens")[0].as_py()
    seconds = time.time() - started
    return {"seconds": seconds, "examples": examples.num_rows, "tokens": tokens, "replies": replies}


def run_ours(recipe, adapter: str | None) -> dict:
    import ray

    from raytune_app.evaluate.run import Candidate, generate

    start_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    examples = examples_of(recipe)
    table = generate(examples, Candidate("m", adapter, "bench"), recipe, None)
    # The pool's wall time from the first batch start to the last batch end (model loads excluded).
    seconds = max(table.column("batch_end").to_pylist()) - min(table.column("batch_start").to_pylist())
    return {
        "seconds": seconds,
        "examples": table.num_rows,
        "tokens": sum(table.column("new_tokens").to_pylist()),
        "replies": dict(zip(table.column("example").to_pylist(), table.column("prediction").to_pylist())),
    }


SIDES = {
    # name: (how, replicas, label)
    "loop": ("loop", 1, "one-at-a-time loop"),
    "transformers": ("transformers", 1, "transformers, Ray Data, 1 replica"),
    "transformers-2": ("transformers", 2, "transformers, Ray Data, 2 replicas"),
    "vllm": ("vllm", 1, "vLLM, ray.data.llm, 1 engine"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--sides", nargs="+", default=["loop", "transformers", "vllm"], choices=list(SIDES))
    parser.add_argument("--adapter", default=None, help="a trained adapter folder (default: the base model alone)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    adapter = os.path.abspath(args.adapter) if args.adapter else None
    if args.precision == "auto":
        from raytune_app.models import cpu_has_bf16

        args.precision = "bf16" if cpu_has_bf16() else "fp32"
    if args.child:
        how, out, replicas = args.child
        backend = "transformers" if how == "loop" else how
        batch = 1 if how == "loop" else args.batch_size
        recipe = recipe_for(out, args.examples, batch, int(replicas), args.max_new_tokens, backend, args.precision)
        print(json.dumps(run_loop(recipe, adapter) if how == "loop" else run_ours(recipe, adapter)))
        return

    from raytune_app.models import resolve

    resolve("bundled:smollm2-135m-instruct")  # convert the bundled model once, outside the timings
    passthrough = [
        "--examples",
        str(args.examples),
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--precision",
        args.precision,
    ] + (["--adapter", adapter] if adapter else [])
    results = {name: [] for name in args.sides}
    for repeat in range(args.repeats):
        for name in args.sides:  # interleaved: each repeat runs every side once
            how, replicas, _ = SIDES[name]
            with tempfile.TemporaryDirectory() as out:
                run = run_measured(__file__, [how, out, str(replicas)], interval=0.5, extra_args=passthrough)
            results[name].append(run)
            print(f"  repeat {repeat + 1}: {name}: {run['examples'] / run['seconds']:.3f} examples/s", flush=True)
    first = args.sides[0]
    baseline = statistics.median(r["examples"] / r["seconds"] for r in results[first])
    reference = results[first][0]["replies"]
    print(
        f"machine: {os.cpu_count()} CPUs (shared); model bundled SmolLM2-135M-Instruct"
        f"{' + adapter ' + args.adapter if args.adapter else ''}; {args.examples} examples, greedy, {args.precision}, "
        f"max_new_tokens {args.max_new_tokens}; median of {args.repeats}; ratio against `{first}`"
    )
    print(
        f"{'setup':<36} {'examples/s':>10} {'tokens/s':>9} {'ratio':>6} {'peak GiB':>8} {'same replies':>12}"
        "   per run ex/s"
    )
    for name in args.sides:
        runs, label = results[name], SIDES[name][2]
        speed = statistics.median(r["examples"] / r["seconds"] for r in runs)
        tokens = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        same = sum(runs[0]["replies"][k] == v for k, v in reference.items())
        print(
            f"{label:<36} {speed:>10.3f} {tokens:>9.1f} {speed / baseline:>5.2f}x "
            f"{statistics.median(r['peak_gib'] for r in runs):>8.2f} {f'{same}/{len(reference)}':>12}   "
            + ", ".join(f"{r['examples'] / r['seconds']:.3f}" for r in runs)
        )


if __name__ == "__main__":
    main()
