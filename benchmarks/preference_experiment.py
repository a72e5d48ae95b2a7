"""After SFT, does DPO on the model's own failures, or GRPO with the schema reward, do better on held-out data?

    .venv/bin/python benchmarks/preference_experiment.py [--output-dir runs] [--dpo-samples 1]

Runs the two shipped recipes on one run directory so they share the SFT step (trained once):
recipes/sft_dpo_extraction.yaml (sft -> pairs from the sft model's failing answers on its training
split -> dpo) and recipes/sft_grpo_extraction.yaml (sft -> grpo with json_schema + field_f1 rewards).
Then evaluates base, sft, sft+dpo and sft+grpo on the same held-out test split (greedy) with the
evaluate stage, and prints the task metrics side by side with the compute each step took (wall
seconds of training on this machine, and of generating the pairs). Results also go to
<run dir>/preference_experiment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = ("json_parse_rate", "schema_valid_rate", "field_f1", "exact_match")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="preference_experiment")
    parser.add_argument("--dpo-samples", type=int, default=1, help="answers sampled per training prompt for the pairs")
    parser.add_argument("--pairs-limit", type=int, help="answer only the first N training prompts for the pairs")
    parser.add_argument("--dpo-steps", type=int, help="stop DPO after N steps (default: the recipe's epoch)")
    parser.add_argument("--grpo-steps", type=int, help="GRPO steps (default: the recipe's)")
    args = parser.parse_args()

    import ray

    from raytune_app import config, storage
    from raytune_app.data.prepare import prepare
    from raytune_app.evaluate.run import evaluate
    from raytune_app.train.run import train_chain

    common = [f"run.name={args.name}", f"run.output_dir={args.output_dir}"]

    def with_step(path: str, **changes):
        """The recipe with its second chain step changed (chain steps are a list: edit, then validate again)."""
        raw = config.load(ROOT / path, common).model_dump(mode="json")
        for key, value in changes.items():
            if value is not None:
                section, field = key.split("__")
                raw["chain"][1].setdefault(section, {})[field] = value
        return config.validate(raw, source=str(ROOT / path))

    dpo_recipe = with_step(
        "recipes/sft_dpo_extraction.yaml",
        pairs__samples=args.dpo_samples,
        pairs__limit=args.pairs_limit,
        train__max_steps=args.dpo_steps,
    )
    grpo_recipe = with_step("recipes/sft_grpo_extraction.yaml", train__max_steps=args.grpo_steps)
    from _harness import start_ray

    start_ray(log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False

    began = time.time()
    prepare(dpo_recipe)  # the top-level data: its test split is what every model is scored on
    dpo_chain = train_chain(dpo_recipe)["chain"]
    pairs = json.loads(Path(dpo_recipe.pairs_dir(1), "pairs.json").read_text())
    summary_dpo = evaluate(dpo_recipe)  # base, sft, dpo (the chain's steps)
    grpo_chain = train_chain(grpo_recipe)["chain"]  # the sft step is found finished and reused
    no_base = grpo_recipe.model_copy(
        update={"evaluate": grpo_recipe.evaluate.model_copy(update={"include_base": False})}
    )
    summary_grpo = evaluate(no_base, adapter=grpo_chain[1]["weights"])

    def seconds(step_weights: str) -> float:
        manifest = json.loads(Path(step_weights).parent.joinpath("manifest.json").read_text())
        return manifest["seconds_this_session"]

    models = {
        "base": (summary_dpo["models"]["base"], "-"),
        "sft": (summary_dpo["models"]["sft"], f"train {seconds(dpo_chain[0]['weights']):.0f} s"),
        "sft + dpo": (
            summary_dpo["models"]["dpo"],
            f"+ pairs {pairs['seconds']:.0f} s + train {seconds(dpo_chain[1]['weights']):.0f} s",
        ),
        "sft + grpo": (
            next(iter(summary_grpo["models"].values())),
            f"+ train {seconds(grpo_chain[1]['weights']):.0f} s",
        ),
    }
    lines = [
        f"quickstart extraction task, held-out test split ({summary_dpo['examples']} examples, greedy); "
        f"pairs: {pairs['pairs']} from {pairs['prompts']} training prompts (sft pass rate {pairs['pass_rate']:.3f})",
        f"{'model':<12}" + "".join(f"{m:>18}" for m in METRICS) + "   compute (this machine)",
    ]
    for name, (result, compute) in models.items():
        lines.append(
            f"{name:<12}"
            + "".join(f"{result.get(m) if result.get(m) is not None else 'n/a':>18}" for m in METRICS)
            + f"   {compute}"
        )
    print("\n".join(lines))
    out = storage.join(storage.absolute(dpo_recipe.run_dir), "preference_experiment.json")
    storage.write_text(
        out,
        json.dumps(
            {
                "table": lines,
                "pairs": pairs,
                "models": {k: v[0] for k, v in models.items()},
                "compute": {k: v[1] for k, v in models.items()},
                "wall_s": round(time.time() - began, 1),
            },
            indent=2,
        )
        + "\n",
    )
    print(f"wrote {out} ({time.time() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
