"""ASHA early stopping vs running every trial to the end: the same search space, the same trials.

    .venv/bin/python benchmarks/tune_asha.py --trials 12 --steps 24

Both sides run the tune stage (raytune_app/tune/run.py) on the same prepared data with the same
seeded random search, so they sample the same trial configurations: LoRA rank, alpha as a multiple
of rank, learning rate (log-uniform) and schedule, on a tiny random Llama learning the quickstart's
order-extraction task. The baseline runs every trial for the full budget (FIFO, no early stopping);
ours stops trials with ASHA at rungs of `grace` x `factor`^k steps. Compute is counted in trial-steps
(optimizer steps summed over trials; counts, so other load on the machine does not change them);
quality is the best final validation loss each search found. Wall times are indicative only. Each
side runs in a fresh subprocess with its own local Ray (2 CPUs: two 1-CPU trials at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import run_measured, start_ray  # noqa: E402

SPACE = {
    "train.lora.rank": {"choice": [4, 8, 16]},
    "train.lora.alpha_ratio": {"choice": [1, 2, 4]},
    "train.learning_rate": {"loguniform": [1.0e-5, 3.0e-2]},
    "train.scheduler": {"choice": ["cosine", "linear", "constant"]},
}


def recipe_for(out: str, model: str, trials: int, steps: int, every: int, asha: bool, grace: int, factor: float):
    from raytune_app import config

    return config.validate(
        {
            "run": {"name": "bench", "output_dir": out, "stages": ["prepare", "tune"], "seed": 0},
            "model": {"path": model},
            "data": {
                "generator": {"name": "order_extraction", "rows": 240, "seed": 0},
                "columns": {"prompt": "message", "response": "extraction"},
                "max_seq_length": 1024,
                "split": {"val": 0.15, "test": 0.0},
            },
            "train": {
                "workers": 1,
                "max_steps": steps,
                "batch_size": 4,
                "warmup": 0,
                "logging_steps": every,
                "checkpoint": {"every_steps": every, "keep_best": 1},
                "lora": {"dropout": 0.0},
                "max_failures": 0,
            },
            "tune": {
                "search_space": SPACE,
                "algorithm": "random",
                "num_samples": trials,
                "seed": 0,
                "register_best": False,
                "early_stopping": {"asha": asha, "grace_period": grace, "reduction_factor": factor},
            },
        }
    )


def run_side(out: str, model: str, trials: int, steps: int, every: int, asha: bool, grace: int, factor: float) -> dict:
    import ray

    from raytune_app.data.prepare import prepare
    from raytune_app.tune.run import tune

    start_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    recipe = recipe_for(out, model, trials, steps, every, asha, grace, factor)
    prepare(recipe)
    summary = tune(recipe)
    rows = json.load(open(Path(recipe.stage_dir("tune")) / "trials.json"))
    ray.shutdown()
    if summary["failed"]:  # e.g. killed by Ray's memory monitor on a crowded machine: the counts would lie
        raise SystemExit(f"{summary['failed']} trial(s) failed; see {recipe.stage_dir('tune')}/search")
    return {
        "trial_steps": summary["steps"]["total"],
        "budget": summary["steps"]["budget"],
        "best": summary["best"]["final_metric"],
        "best_config": summary["best"]["config"],
        "stopped": summary["stopped_early"],
        "seconds": summary["seconds_this_session"],
        "trials": [{"config": r["config"], "steps": r["steps"], "final": r["final_metric"]} for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=24, help="budget of each trial, in optimizer steps")
    parser.add_argument("--every", type=int, default=3, help="evaluate and report every N steps")
    parser.add_argument("--grace", type=int, default=3)
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out, model, trials, steps, every, asha, grace, factor = args.child
        print(
            json.dumps(
                run_side(out, model, int(trials), int(steps), int(every), asha == "asha", int(grace), float(factor))
            )
        )
        return

    from raytune_app.tiny import build_tiny_llama

    with tempfile.TemporaryDirectory() as root:
        model = build_tiny_llama(os.path.join(root, "llama"), hidden_size=64, layers=2)
        results = {}
        for side in ("full", "asha"):
            child = [
                os.path.join(root, side),
                model,
                str(args.trials),
                str(args.steps),
                str(args.every),
                side,
                str(args.grace),
                str(args.factor),
            ]
            results[side] = run_measured(__file__, child, interval=1.0)
    full, asha = results["full"], results["asha"]
    print(
        f"search: {args.trials} trials, random (seed 0) over {', '.join(SPACE)}; budget {args.steps} steps per trial, "
        f"a report every {args.every}; ASHA grace {args.grace}, factor {args.factor:g}; tiny Llama "
        "(hidden 64, 2 layers), 1 worker x 1 CPU per trial, 2 at a time"
    )
    print(
        f"{'search':<28}{'trial-steps':>12}{'compute':>9}{'best eval_loss':>16}{'vs full':>9}{'stopped':>9}"
        f"{'wall s':>8}"
    )
    for name, r in (("every trial to the end", full), ("ASHA (ours)", asha)):
        print(
            f"{name:<28}{r['trial_steps']:>12}{full['trial_steps'] / r['trial_steps']:>8.2f}x{r['best']:>16.4f}"
            f"{(r['best'] - full['best']) / full['best'] * 100:>+8.2f}%{r['stopped']:>9}{r['seconds']:>8.0f}"
        )
    same = [a["config"] == f["config"] for a, f in zip(asha["trials"], full["trials"])]
    print(
        f"same trial configurations on both sides: {all(same)}; best config full {full['best_config']}, "
        f"ASHA {asha['best_config']}"
    )
    print(json.dumps({"full": full, "asha": asha}))


if __name__ == "__main__":
    main()
