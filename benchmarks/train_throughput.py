"""Training throughput: plain TRL vs our Ray Train stage, same model, data and examples seen.

    .venv/bin/python benchmarks/train_throughput.py --examples 96 --repeats 3

    (a) plain TRL `SFTTrainer` in one process, its defaults (padding to the longest in each batch,
        gradient checkpointing on), LoRA r=16 all-linear, prompt-completion data (loss on the answer);
    (b) our train stage, 1 Ray Train worker on all cores: pre-tokenised, packed, padding-free batches;
    (c) the same with 2 workers (one core each, gloo all-reduce).

All three train one epoch over the same examples of the quickstart task on the bundled
SmolLM2-135M-Instruct, with the same precision, learning rate and schedule, so they see the same real
tokens; each then reports validation loss on the same held-out examples (a faster run that learns
less does not count). Tokens/s counts real (non-pad) tokens: prompt and answer, as the model reads
them. Every run is a fresh subprocess; peak memory is the largest total RSS of its process tree.
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

MODEL = "bundled:smollm2-135m-instruct"


def recipe_for(out: str, examples: int, workers: int, precision: str):
    from raytune_app import config

    # rows chosen so that ~80% land in train: the split is by hash, the example count is what it is.
    return config.load(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={out}",
            f"data.generator.rows={int(examples / 0.8)}",
            "data.split.val=0.2",
            "data.split.test=0.0",
            f"train.workers={workers}",
            f"train.precision={precision}",
            "train.epochs=1",
            "train.logging_steps=5",
            "train.checkpoint.every_steps=100000",
            "train.max_failures=0",
        ],
    )


def run_ours(out: str, examples: int, workers: int, precision: str) -> dict:
    import ray

    from raytune_app.data.prepare import load_split, prepare
    from raytune_app.train.run import train

    start_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    recipe = recipe_for(out, examples, workers, precision)
    prepare(recipe)
    started = time.time()
    manifest = train(recipe)
    seconds = time.time() - started
    history = [json.loads(line) for line in open(Path(recipe.stage_dir("train")) / "metrics.jsonl")]
    train_runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    return {
        "tokens": manifest["tokens_seen"],
        "train_seconds": train_runtime,
        "wall_seconds": seconds,
        "eval_loss": manifest["final_eval_loss"],
        "examples": load_split(recipe.stage_dir("prepare"), "train").num_rows,
    }


def run_plain_trl(out: str, examples: int, precision: str) -> dict:
    """TRL as a user would start: raw prompt/completion examples, TRL tokenises and pads."""
    import datasets
    import ray
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from raytune_app import models
    from raytune_app.data.prepare import load_split, prepare

    # The same prepared splits (so the same examples), reduced to their text.
    start_ray()
    recipe = recipe_for(out, examples, 1, precision)
    prepare(recipe)
    ray.shutdown()

    def as_prompt_completion(split):
        chats = load_split(recipe.stage_dir("prepare"), split)["messages"].to_pylist()
        return datasets.Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in chats])

    train_set, val_set = as_prompt_completion("train"), as_prompt_completion("val")
    path = models.resolve(MODEL)
    tokenizer = models.load_tokenizer(MODEL)
    lora = recipe.train.lora
    args = SFTConfig(
        output_dir=os.path.join(out, "trl"),
        use_cpu=True,
        bf16=precision == "bf16",
        per_device_train_batch_size=recipe.train.batch_size,
        per_device_eval_batch_size=recipe.train.batch_size,
        learning_rate=recipe.train.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.train.warmup,
        num_train_epochs=1,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora.rank,
            lora_alpha=lora.effective_alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    started = time.time()
    output = trainer.train()
    seconds = time.time() - started
    return {
        "tokens": trainer.state.num_input_tokens_seen,
        "train_seconds": output.metrics["train_runtime"],
        "wall_seconds": seconds,
        "eval_loss": trainer.evaluate()["eval_loss"],
        "examples": len(train_set),
    }


def measure(side: str, examples: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return run_measured(__file__, [side, out, str(examples), precision], interval=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, out, examples, precision = args.child
        examples = int(examples)
        if side == "trl":
            result = run_plain_trl(out, examples, precision)
        else:
            result = run_ours(out, examples, 1 if side == "ours1" else 2, precision)
        print(json.dumps(result))
        return

    from raytune_app.models import resolve

    resolve(MODEL)
    sides = [("trl", "(a) plain TRL, 1 process"), ("ours1", "(b) ours, 1 worker"), ("ours2", "(c) ours, 2 workers")]
    results = {side: [measure(side, args.examples, args.precision) for _ in range(args.repeats)] for side, _ in sides}
    speed = {side: statistics.median(r["tokens"] / r["train_seconds"] for r in runs) for side, runs in results.items()}
    print(
        f"machine: {os.cpu_count()} CPUs; model {MODEL}, LoRA r=16 all-linear, {args.precision}; "
        f"median of {args.repeats}"
    )
    print(
        f"{'setup':<26} {'examples':>8} {'real tokens':>11} {'tokens/s':>9} {'val loss':>9} {'peak GiB':>9} "
        f"{'wall s':>7}"
    )
    for side, label in sides:
        runs = results[side]
        print(
            f"{label:<26} {runs[0]['examples']:>8} {runs[0]['tokens']:>11} {speed[side]:>9.1f} "
            f"{statistics.median(r['eval_loss'] for r in runs):>9.4f} "
            f"{statistics.median(r['peak_gib'] for r in runs):>9.2f} "
            f"{statistics.median(r['wall_seconds'] for r in runs):>7.0f}   tokens/s per run: "
            + ", ".join(f"{r['tokens'] / r['train_seconds']:.0f}" for r in runs)
        )
    print(f"ratios: b/a = {speed['ours1'] / speed['trl']:.2f}x, c/b = {speed['ours2'] / speed['ours1']:.2f}x")


if __name__ == "__main__":
    main()
