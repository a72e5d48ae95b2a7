"""After SFT, which preference loss helps on the model's own failures: plain DPO, DPO with an SFT term, or ORPO?

    .venv/bin/python benchmarks/preference_losses.py [--output-dir runs] [--pairs-limit N] [--steps N]
        [--variants dpo dpo_sft orpo simpo]

One run directory, one SFT step (recipes/sft_dpo_extraction.yaml's first chain step, trained once), one set of
pairs (the SFT model's failing greedy answers on its training split: chosen = the reference, rejected = the
answer), split the same way for every variant (a shared `data.split.salt`); then each variant trains its own
second chain step from the SFT adapter on those pairs:

    dpo       TRL DPO, sigmoid loss (the DPO paper), beta 0.1, the SFT adapter as the frozen reference
    dpo_sft   the same plus the chosen answer's NLL (loss_type [sigmoid, sft]), which should keep DPO from
              lowering the likelihood of good answers ("likelihood displacement")
    orpo      ORPO: SFT loss + odds-ratio term (beta 0.1), no reference model
    simpo     SimPO (TRL's CPO trainer, simpo loss): length-normalised margin, no reference model

Every model is scored by the evaluate stage on the same held-out test split (greedy), and by the mean
per-token log-likelihood of the reference answers of that test split and of the chosen / rejected answers of
the held-out validation pairs (transformers + PEFT, in this process), before (the SFT model) and after each
variant. Prints one table; results also go to <run dir>/preference_losses.json. Finished steps are reused
when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = ("schema_valid_rate", "field_f1", "exact_match")
VARIANTS = {
    "dpo": {"method": "dpo", "dpo": {"beta": 0.1, "loss_type": "sigmoid"}},
    "dpo_sft": {"method": "dpo", "dpo": {"beta": 0.1, "loss_type": ["sigmoid", "sft"]}},
    "orpo": {"method": "orpo", "orpo": {"beta": 0.1}},
    "simpo": {"method": "simpo", "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}},
}
SALT = "pairs:shared"  # every variant splits the pairs alike (train / validation)


def variant_recipe(name: str, args):
    from raytune_app import config

    raw = config.load(
        ROOT / "recipes/sft_dpo_extraction.yaml", [f"run.name={args.name}", f"run.output_dir={args.output_dir}"]
    ).model_dump(mode="json")
    step = raw["chain"][1]
    step["name"] = name
    step["train"] = step["train"] | VARIANTS[name]
    if args.steps:
        step["train"]["max_steps"] = args.steps
    step["data"] = {"split": {"salt": SALT}}
    if args.pairs_limit:
        step["pairs"]["limit"] = args.pairs_limit
    return config.validate(raw, source=str(ROOT / "recipes/sft_dpo_extraction.yaml"))


def log_likelihoods(recipe, weights: dict[str, str | None], prompts: list[list[dict]], answers: list[str]) -> dict:
    """Mean per-token log-probability of each answer after its prompt (chat template), per model (name ->
    adapter folder; None: the base model), averaged over the answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raytune_app import models
    from raytune_app.serve import prompt

    tokenizer = models.load_tokenizer(recipe.model.path)
    encoded = []
    for messages, answer in zip(prompts, answers):
        prompt_ids = prompt.chat_ids(tokenizer, messages)  # the template with a generation prompt, as served
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt_ids, answer_ids))
    out = {}
    base = AutoModelForCausalLM.from_pretrained(models.resolve(recipe.model.path), dtype=torch.float32)
    for name, folder in weights.items():
        model = (PeftModel.from_pretrained(base, folder) if folder else base).eval()
        total = 0.0
        with torch.no_grad():
            for prompt_ids, answer_ids in encoded:
                ids = torch.tensor([prompt_ids + answer_ids])
                logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
                logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer_ids)[:, None])
                total += logprobs.mean().item()
        out[name] = round(total / len(encoded), 4)
        if folder:
            base = model.unload()  # the bare base model again for the next adapter
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="preference_losses")
    parser.add_argument("--variants", nargs="+", default=["dpo", "dpo_sft", "orpo"], choices=sorted(VARIANTS))
    parser.add_argument("--pairs-limit", type=int, help="answer only the first N training prompts for the pairs")
    parser.add_argument("--steps", type=int, help="preference steps per variant (default: the recipe's epoch)")
    args = parser.parse_args()

    import ray

    from raytune_app import storage
    from raytune_app.data.prepare import load_split, prepare
    from raytune_app.evaluate.run import evaluate
    from raytune_app.train.run import train_chain

    recipes = {name: variant_recipe(name, args) for name in args.variants}
    first = recipes[args.variants[0]]
    from _harness import start_ray

    start_ray(log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False

    began = time.time()
    prepare(first)  # the top-level data: its test split is what every model is scored on
    chains, seconds = {}, {}
    for name, recipe in recipes.items():
        shared = Path(first.pairs_dir(1))
        if name != args.variants[0] and shared.exists() and not Path(recipe.pairs_dir(1)).exists():
            # The same SFT model, data and pairs settings: the copy is found unchanged and reused.
            shutil.copytree(shared, recipe.pairs_dir(1))
        chains[name] = train_chain(recipe)["chain"]
        manifest = json.loads(Path(chains[name][1]["weights"]).parent.joinpath("manifest.json").read_text())
        seconds[name] = manifest["seconds_this_session"]
    pairs = json.loads((Path(first.pairs_dir(1)) / "pairs.json").read_text())
    sft_weights = chains[args.variants[0]][0]["weights"]

    # One evaluation per model by its weights (chain.json names only the variant that ran last).
    summary = evaluate(first, adapter=sft_weights)  # the base model and the sft step
    scores = {"base": summary["models"].pop("base"), "sft": next(iter(summary["models"].values()))}
    for name in args.variants:
        recipe = recipes[name]
        no_base = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"include_base": False})})
        scores[name] = next(iter(evaluate(no_base, adapter=chains[name][1]["weights"])["models"].values()))

    # Held-out answers: the test split's references, and the validation pairs' chosen / rejected answers.
    test = load_split(storage.absolute(first.stage_dir("prepare")), "test").column("messages").to_pylist()
    val = load_split(storage.absolute(first.chain_step(1).stage_dir("prepare")), "val").to_pylist()
    weights = {"sft": sft_weights} | {name: chains[name][1]["weights"] for name in args.variants}
    test_ll = log_likelihoods(first, weights, [m[:-1] for m in test], [m[-1]["content"] for m in test])
    val_prompts = [row["prompt"] for row in val]
    chosen_ll = log_likelihoods(first, weights, val_prompts, [row["chosen"][-1]["content"] for row in val])
    rejected_ll = log_likelihoods(first, weights, val_prompts, [row["rejected"][-1]["content"] for row in val])

    lines = [
        f"quickstart extraction task: held-out test split ({summary['examples']} examples, greedy); pairs: "
        f"{pairs['pairs']} from {pairs['prompts']} training prompts (sft pass rate {pairs['pass_rate']:.3f}), "
        f"{len(val)} held out for validation",
        f"{'model':<9}"
        + "".join(f"{m:>18}" for m in METRICS)
        + f"{'test ref LL':>13}{'val chosen LL':>15}{'val rejected LL':>17}   train (s)",
    ]
    for name in ["base", "sft", *args.variants]:
        row = scores[name]
        cells = "".join(f"{row.get(m) if row.get(m) is not None else 'n/a':>18}" for m in METRICS)
        ll = (
            f"{test_ll[name]:>13}{chosen_ll[name]:>15}{rejected_ll[name]:>17}"
            if name in test_ll
            else f"{'-':>13}{'-':>15}{'-':>17}"
        )
        lines.append(f"{name:<9}{cells}{ll}   {seconds.get(name, '-')}")
    print("\n".join(lines))
    out = storage.join(storage.absolute(first.run_dir), "preference_losses.json")
    record = {
        "table": lines,
        "pairs": pairs,
        "scores": scores,
        "log_likelihood": {"test_reference": test_ll, "val_chosen": chosen_ll, "val_rejected": rejected_ll},
        "train_seconds": seconds,
        "wall_s": round(time.time() - began, 1),
    }
    storage.write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({time.time() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
