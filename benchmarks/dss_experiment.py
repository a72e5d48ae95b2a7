"""Distilling Step-by-Step vs label-only fine-tuning at equal data (recipes/dss.yaml).

    .venv/bin/python benchmarks/dss_experiment.py [--fractions 0.5 1.0] [--rows 800] [--epochs 2]

For each share of the training inputs (`distill.subsample`, chosen by content hash, so every variant
of a share sees the same inputs) it trains two students from the same recipe:
  label-only:  train.distill.rationale_weight = 0   (plain fine-tuning on "[label] question -> answer")
  step-by-step: rationale_weight = 1                (plus "[rationale] question -> worked solution")
and evaluates both, asked with the label prefix, on the same held-out test split (normalised answer
match, greedy). The base model is evaluated once, asked plainly. Teacher: the arithmetic program
(exact, so the gold filter keeps every rationale); the student: the bundled SmolLM2-135M-Instruct.
Prints one table; each cell is one training run (seeded), so small differences are within noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--out", default=None, help="output root (default: a temporary folder)")
    args = parser.parse_args()

    import ray

    from raytune_app import config
    from raytune_app.data.prepare import prepare
    from raytune_app.distill.run import distill
    from raytune_app.evaluate.run import evaluate
    from raytune_app.train.run import train

    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    out = args.out or tempfile.mkdtemp(prefix="dss-experiment-")
    results, base = [], None
    for fraction in args.fractions:
        for weight in (0.0, 1.0):
            name = f"dss-{fraction}-{weight}"
            recipe = config.load(
                ROOT / "recipes" / "dss.yaml",
                [
                    f"run.output_dir={out}",
                    f"run.name={name}",
                    f"data.generator.rows={args.rows}",
                    f"distill.subsample={fraction}",
                    f"train.distill.rationale_weight={weight}",
                    f"train.epochs={args.epochs}",
                    f"evaluate.include_base={'true' if base is None else 'false'}",
                ],
            )
            began = time.time()
            prepare(recipe)
            distilled = distill(recipe)
            train(recipe)
            summary = evaluate(recipe)
            if base is None:
                base = summary["models"]["base"]["normalised_match"]
            tuned = summary["models"]["tuned"]
            results.append(
                (
                    fraction,
                    weight,
                    distilled["inputs"],
                    distilled["tasks"],
                    tuned["normalised_match"],
                    summary["examples"],
                    time.time() - began,
                )
            )
            print(f"[dss-experiment] {name}: {tuned['normalised_match']}", file=sys.stderr, flush=True)

    print(
        f"\nmulti-step arithmetic, SmolLM2-135M-Instruct student, {args.epochs} epochs; answer accuracy on the "
        f"test split ({results[0][5]} problems); base model (asked plainly): {base}\n"
    )
    print(f"{'share':>6}{'inputs':>8}{'variant':>15}{'train rows':>12}{'accuracy':>10}{'minutes':>9}")
    for fraction, weight, inputs, tasks, accuracy, _, seconds in results:
        variant = "step-by-step" if weight else "label-only"
        print(
            f"{fraction:>6}{inputs:>8}{variant:>15}{sum(tasks.values()) if weight else tasks['label']:>12}"
            f"{accuracy:>10.3f}{seconds / 60:>9.1f}"
        )


if __name__ == "__main__":
    main()
