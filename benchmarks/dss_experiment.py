"""Distilling Step-by-Step vs label-only fine-tuning at equal data, over data sizes and lambda values.

    .venv/bin/python benchmarks/dss_experiment.py --dataset esnli --sizes 200 400 800 --lambdas 0 1 \\
        --steps 60 --eval-limit 300 --results runs/dss-esnli-pilot.jsonl

Data sets (each a shipped recipe, so the experiment runs what a user runs):
  arithmetic  recipes/dss.yaml        generated word problems, the arithmetic program as teacher
  esnli       recipes/dss_esnli.yaml  ../shared/data/esnli, its human explanations as rationales
  gsm8k       recipes/dss_gsm8k.yaml  ../shared/data/gsm8k, its worked solutions as rationales
One cell is (data set, training inputs, lambda, seed): `distill.subsample` picks the inputs by content
hash (so every lambda of a size sees the same inputs, and a smaller size is a subset of a larger one);
lambda is `train.distill.rationale_weight` (0: the label-only baseline on the same inputs); the student
(the bundled SmolLM2-135M-Instruct) trains for `--steps` optimizer steps (the same budget for every
cell, so step-by-step is not given more updates) or `--epochs`; then it is asked with the label prefix
on the first `--eval-limit` rows of the held-out test split (normalised match, greedy). The base model
is evaluated on the same rows, shown the first `--base-shots` training examples as earlier turns (few-shot;
default: the recipe's `evaluate.base_shots`; 0: asked plainly): one record per number of shots.

Beside each cell's accuracy and its 95% Wilson interval, the table gives, per size, step-by-step minus
label-only on the same test rows with a paired bootstrap 95% interval (the rows are resampled together,
so the noise both variants share cancels out).

Each finished cell is appended to the `--results` JSONL at once; a rerun with the same file skips the
cells already there (same data set, size, lambda, seed, budget and evaluation), so a table cut short by
a crash or a time limit is finished by running the same command again. The data is prepared once and
copied into each cell's run directory. Prints the table with 95% Wilson intervals and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {"arithmetic": "dss.yaml", "esnli": "dss_esnli.yaml", "gsm8k": "dss_gsm8k.yaml"}


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at small n and near 0 or 1, unlike p ± 2se)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def machine() -> str:
    """CPU model, cores, memory, GPU and torch version: what a reader needs to compare timings."""
    import psutil
    import torch

    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory = psutil.virtual_memory().total / 2**30
    return f"{model}, {os.cpu_count()} vCPUs, {memory:.0f} GiB, {gpu}, torch {torch.__version__}"


def cell_key(args, size: int | float | None, weight: float | None, seed: int) -> dict:
    """Everything a cell's result depends on; a rerun skips a cell whose key is in the results file."""
    return {
        "dataset": args.dataset,
        "size": size,
        "lambda": weight,
        "seed": seed,
        "steps": args.steps,
        "epochs": None if args.steps else args.epochs,
        "eval_limit": args.eval_limit,
        "rows": args.rows if args.dataset == "arithmetic" else None,
        "set": sorted(args.set or []),  # recipe overrides change the result too
    }


def base_key(args) -> dict:
    """What a base-model record depends on (no training: size, lambda and budget do not apply)."""
    return {
        "dataset": args.dataset,
        "base_shots": args.base_shots,
        "eval_limit": args.eval_limit,
        "rows": args.rows if args.dataset == "arithmetic" else None,
        "set": sorted(args.set or []),
    }


def cell_name(key: dict, legacy: bool = False) -> str:
    """A cell's run folder under --out: one per data set, size, lambda, seed and budget (cells of two budgets in
    one --out must not share a folder: the second would reuse or resume the first's training). `legacy`: the
    name before the budget was part of it (results files of 2026-11-30 and before)."""
    name = f"{key['dataset']}-{key['size']}-{key['lambda']}-s{key['seed']}"
    if legacy:
        return name
    return name + (f"-{key['steps']}steps" if key["steps"] else f"-{key['epochs']:g}ep")


def base_name(key: dict) -> str:
    """The base model's run folder under --out, one per number of shots."""
    return f"{key['dataset']}-base-{key['base_shots']}shot"


def done_cells(path: Path) -> list[dict]:
    if not path.exists():
        return []
    cells = []
    for line in path.read_text().splitlines():
        try:
            cells.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: that cell runs again
    return cells


def _overrides(args, out: str, name: str, seed: int) -> list[str]:
    common = [
        f"run.output_dir={out}",
        f"run.name={name}",
        f"run.seed={seed}",
        "run.stages=[prepare,distill,train,evaluate]",
    ]
    if args.dataset == "arithmetic":
        common.append(f"data.generator.rows={args.rows}")
    if args.steps:
        common += [f"train.max_steps={args.steps}", f"train.checkpoint.every_steps={args.steps}"]
    else:
        common += ["train.max_steps=null", f"train.epochs={args.epochs}"]
    if args.eval_limit:
        common.append(f"evaluate.limit={args.eval_limit}")
    return common + list(args.set or [])


def _share(size: float, available: int) -> float:
    """`--sizes` are input counts (> 1) or shares (<= 1) of the prepared train split."""
    return min(1.0, size / available) if size > 1 else size


def _outcome(summary: dict, model: str) -> dict:
    """A model's rows on the test split, read once from its predictions: `correct_rows` (1 / 0 per row in the
    split's order: what the paired comparison resamples) and `top_answer` ([reply, share] of the reply given
    most often: a share near 1 means one answer for every row)."""
    from collections import Counter

    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(summary["output_dir"], "predictions.parquet")).to_pylist()
    rows = [row for row in table if row["model"] == model]
    answer, count = Counter(row["prediction"].strip() for row in rows).most_common(1)[0]
    return {
        "correct_rows": [int(bool(row["normalised_match"])) for row in rows],
        "top_answer": [answer, round(count / len(rows), 3)],
    }


def _backfill_rows(cells: list[dict], out: str | None) -> None:
    """Records written before rows and answers were kept (older results files): both from the predictions."""
    for c in cells:
        key = c["key"]
        if ("correct_rows" in c and "top_answer" in c) or not out:
            continue
        if "lambda" in key:
            name, model = cell_name(key), "tuned"
            if not os.path.exists(os.path.join(out, name)):
                name = cell_name(key, legacy=True)
        elif "base_shots" in key:
            name, model = base_name(key), "base"
        else:
            continue
        summary = {"output_dir": os.path.join(out, name, "evaluate")}
        if os.path.exists(os.path.join(summary["output_dir"], "predictions.parquet")):
            c.update(_outcome(summary, model))


def _copy_prepared(recipe, prepared_dir: str) -> None:
    """The data prepared once, copied into a record's run folder: same inputs and settings, so the prepare
    stage finds it and reuses it."""
    target = recipe.stage_dir("prepare")
    if not os.path.exists(target):
        shutil.copytree(prepared_dir, target)


def run_base(args, out: str, prepared_dir: str) -> dict:
    """The base model on the test rows, no training: asked plainly or with `--base-shots` examples first."""
    from raytune_app import config
    from raytune_app.evaluate.run import evaluate

    recipe = config.load(
        ROOT / "recipes" / RECIPES[args.dataset],
        _overrides(args, out, base_name(base_key(args)), 0)
        + ["run.stages=[prepare,evaluate]", "evaluate.include_base=true", f"evaluate.base_shots={args.base_shots}"],
    )
    _copy_prepared(recipe, prepared_dir)
    began = time.time()
    outcome = _outcome(evaluate(recipe), "base")
    rows = outcome["correct_rows"]
    return {"n": len(rows), "correct": sum(rows), **outcome, "seconds": round(time.time() - began, 1)}


def run_cell(args, out: str, prepared_dir: str, size, weight, seed: int, available: int) -> dict:
    from raytune_app import config
    from raytune_app.data.prepare import prepare
    from raytune_app.distill.run import distill
    from raytune_app.evaluate.run import evaluate
    from raytune_app.train.run import train

    name = cell_name(cell_key(args, size, weight, seed))
    recipe = config.load(
        ROOT / "recipes" / RECIPES[args.dataset],
        _overrides(args, out, name, seed)
        + [
            f"distill.subsample={_share(size, available)}",
            f"train.distill.rationale_weight={weight}",
            "evaluate.include_base=false",  # the base has a record of its own (run_base)
        ],
    )
    _copy_prepared(recipe, prepared_dir)
    began = time.time()
    prepare(recipe)
    distilled = distill(recipe)
    trained = train(recipe)
    summary = evaluate(recipe)
    tuned = summary["models"]["tuned"]
    n = summary["examples"]
    result = {
        "inputs": distilled["inputs"],
        "tasks": distilled["tasks"],
        "kept_rationales": distilled["kept_rationales"],
        "train_rows": sum(distilled["tasks"].values()) if weight else distilled["tasks"].get("label", 0),
        "steps": trained.get("global_step"),
        "n": n,
        "correct": round(tuned["normalised_match"] * n),
        "accuracy": tuned["normalised_match"],
        **_outcome(summary, "tuned"),
        "seconds": round(time.time() - began, 1),
    }
    return result


def paired_difference(better: list[int], baseline: list[int], resamples: int = 10_000) -> tuple[float, float, float]:
    """Mean of better - baseline over the same rows, with a paired bootstrap 95% interval."""
    import numpy as np

    diff = np.asarray(better, dtype=float) - np.asarray(baseline, dtype=float)
    picks = np.random.default_rng(0).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[picks].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table(args, cells: list[dict], where: str) -> str:
    """The cells of this command's grid (from the results file, finished in any run) as text."""
    wanted = {
        json.dumps(cell_key(args, s, w, seed), sort_keys=True)
        for s in args.sizes
        for w in args.lambdas
        for seed in args.seeds
    }
    rows = [c for c in cells if json.dumps(c["key"], sort_keys=True) in wanted]
    rows.sort(key=lambda c: (c["key"]["size"], c["key"]["lambda"], c["key"]["seed"]))
    budget = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    lines = [
        f"\n{args.dataset}: SmolLM2-135M-Instruct student, LoRA, {budget} per cell; accuracy = normalised match on "
        f"the first {args.eval_limit or 'all'} test rows, 95% Wilson interval",
        f"machine: {rows[0]['machine'] if rows else machine()}; results: {where}",
        "",
        f"{'size':>6}{'inputs':>8}{'lambda':>8}{'seed':>6}{'train rows':>12}{'steps':>7}{'accuracy':>10}"
        f"{'95% CI':>17}{'minutes':>9}  most given answer",
    ]
    for c in rows:
        low, high = wilson(c["correct"], c["n"])
        lines.append(
            f"{c['key']['size']:>6}{c['inputs']:>8}{c['key']['lambda']:>8}{c['key']['seed']:>6}{c['train_rows']:>12}"
            f"{c.get('steps') or '-':>7}{c['accuracy']:>10.3f}{f'[{low:.3f}, {high:.3f}]':>17}{c['seconds'] / 60:>9.1f}"
            f"  {_shown_top(c)}"
        )
    lines += _differences(rows) + _bases(args, cells)
    missing = len(wanted) - len(rows)
    if missing:
        lines.append(f"{missing} cell(s) of this grid not run yet: run the same command again to finish them")
    return "\n".join(lines)


def _shown_top(record: dict) -> str:
    if "top_answer" not in record:
        return "-"
    answer, share = record["top_answer"]
    return f"{answer[:24]!r} {share:.0%}"


def _differences(rows: list[dict]) -> list[str]:
    """Per (size, seed, lambda > 0): accuracy minus the label-only cell's on the same rows, paired bootstrap."""
    out = []
    label_only = {(c["key"]["size"], c["key"]["seed"]): c for c in rows if c["key"]["lambda"] == 0}
    for c in rows:
        baseline = label_only.get((c["key"]["size"], c["key"]["seed"]))
        if c["key"]["lambda"] == 0 or baseline is None or "correct_rows" not in c or "correct_rows" not in baseline:
            continue
        mean, low, high = paired_difference(c["correct_rows"], baseline["correct_rows"])
        out.append(
            f"size {c['key']['size']}, seed {c['key']['seed']}: lambda {c['key']['lambda']} minus label-only "
            f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap, {len(c['correct_rows'])} rows)"
        )
    return [""] + out if out else []


def _bases(args, cells: list[dict]) -> list[str]:
    """The base model's records on the same test rows: few-shot ones, and the plain one of older grids."""
    out = []
    for c in cells:
        key = c["key"]
        if key.get("dataset") != args.dataset or key.get("eval_limit") != args.eval_limit:
            continue
        if "base_shots" in key and key.get("set") == sorted(args.set or []):
            shots, correct, n = key["base_shots"], c["correct"], c["n"]
        elif "base_correct" in c:  # older grids evaluated the base beside their first cell, asked plainly
            shots, correct, n = 0, c["base_correct"], c["n"]
        else:
            continue
        low, high = wilson(correct, n)
        how = f"shown {shots} training examples first" if shots else "asked plainly"
        out.append(
            f"base model ({how}): {correct / n:.3f} [{low:.3f}, {high:.3f}] on {n} rows; most given answer "
            f"{_shown_top(c)}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="arithmetic")
    parser.add_argument(
        "--sizes",
        "--fractions",  # the flag's name before sizes could be counts (BENCHMARKS.md, 2026-11-26)
        type=float,
        nargs="+",
        default=[0.5, 1.0],
        help="training inputs per cell: counts (> 1) or shares of the train split (<= 1)",
    )
    parser.add_argument(
        "--lambdas", type=float, nargs="+", default=[0.0, 1.0], help="rationale weights; 0 = label-only"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per cell (same for every cell)")
    parser.add_argument("--epochs", type=float, default=2, help="passes over the data, where --steps is not given")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N test rows (default: all)")
    parser.add_argument(
        "--base-shots",
        type=int,
        default=None,
        help="the base model is shown this many training examples first (default: the recipe's evaluate.base_shots)",
    )
    parser.add_argument("--rows", type=int, default=800, help="arithmetic: generated problems")
    parser.add_argument("--set", nargs="*", help="more recipe overrides, key=value (e.g. train.batch_size=4)")
    parser.add_argument("--results", default=None, help="JSONL of finished cells (default: <out>/results.jsonl)")
    parser.add_argument("--out", default=None, help="output root (default: a temporary folder)")
    parser.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells (time-boxing)")
    args = parser.parse_args()
    args.sizes = [int(s) if s > 1 else s for s in args.sizes]
    if args.base_shots is None:
        from raytune_app import config

        args.base_shots = config.load(ROOT / "recipes" / RECIPES[args.dataset]).evaluate.base_shots

    out = args.out or tempfile.mkdtemp(prefix="dss-experiment-")
    results = Path(args.results or os.path.join(out, "results.jsonl"))
    results.parent.mkdir(parents=True, exist_ok=True)
    cells = done_cells(results)
    done = {json.dumps(c["key"], sort_keys=True) for c in cells}
    todo = [
        (s, w, seed)
        for seed in args.seeds
        for s in args.sizes
        for w in args.lambdas
        if json.dumps(cell_key(args, s, w, seed), sort_keys=True) not in done
    ]
    todo = todo if args.max_cells is None else todo[: args.max_cells]
    # --max-cells bounds the base's evaluation too (0: only the table of what is there).
    base_todo = json.dumps(base_key(args), sort_keys=True) not in done and args.max_cells != 0
    print(f"[dss-experiment] {len(done)} record(s) in {results}; running {len(todo)} cell(s)", file=sys.stderr)
    try:
        if todo or base_todo:
            run_grid(args, out, results, cells, todo, base_todo)
    finally:  # also after Ctrl-C or a failed cell: the table of every cell finished so far
        _backfill_rows(cells, args.out)
        print(table(args, cells, str(results)))


def run_grid(args, out: str, results: Path, cells: list[dict], todo: list[tuple], base_todo: bool) -> None:
    """Prepare once, then run each cell (and the base) and append its line to `results` as soon as it is done."""
    from _harness import start_ray

    from raytune_app import config
    from raytune_app.data.prepare import prepare

    start_ray()
    first = config.load(ROOT / "recipes" / RECIPES[args.dataset], _overrides(args, out, "prepared", 0))
    available = prepare(first)["rows_out"]["train"]
    host = machine()

    def record(key: dict, result: dict) -> None:
        line = {"key": key, **result, "machine": host, "date": time.strftime("%Y-%m-%d")}
        with results.open("a") as sink:  # one whole line per finished cell
            sink.write(json.dumps(line) + "\n")
        cells.append(line)
        print(f"[dss-experiment] {key}: {result['correct']}/{result['n']} in {result['seconds']} s", file=sys.stderr)

    if base_todo:
        record(base_key(args), run_base(args, out, first.stage_dir("prepare")))
    for size, weight, seed in todo:
        record(
            cell_key(args, size, weight, seed),
            run_cell(args, out, first.stage_dir("prepare"), size, weight, seed, available),
        )


if __name__ == "__main__":
    main()
