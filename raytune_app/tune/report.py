"""The tune stage's results: a row per trial, the table, the plot, the best recipe, and the summary.

Called by raytune_app/tune/run.py once a search has ended (MLflow logging is in tracking.py):
    trials.json / trials.md   config, final and best metric, steps run, stopped early or not, wall time
    tune_plot.png             the metric against each searched field (alpha too, when alpha_ratio is
                              searched), and every trial's metric by step (where ASHA cut them)
    best_recipe.yaml          the recipe with the best trial's train section: `raytune-app run` on it
                              trains that configuration (the same train fingerprint as the trial)
    summary.json              written last; marks the search finished
"""

from __future__ import annotations

import io
import json
import math

import yaml

from raytune_app import storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError
from raytune_app.tune.settings import ALPHA_RATIO
from raytune_app.tune.trials import trial_recipe


def trial_rows(results, recipe: Recipe, space: dict, trials_dir: str) -> list[dict]:
    """One row per trial of a Ray Tune ResultGrid, in trial order."""
    metric, max_steps = recipe.tune.metric, recipe.train.max_steps or 0  # set: the tune section requires it
    better = min if recipe.tune.mode == "min" else max
    rows = []
    for result in results:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        history: dict[str, list] = {metric: [], "loss": []}
        frame = result.metrics_dataframe
        if frame is not None and "step" in frame.columns:
            for key in history:
                if key in frame.columns:
                    part = frame[["step", key]].dropna()
                    history[key] = [[int(s), float(v)] for s, v in zip(part["step"], part[key])]
        steps = int(last.get("step") or 0)
        final = last.get(metric)
        completed = storage.exists(storage.join(trials_dir, trial_id, "manifest.json"))
        if result.error is not None:
            status = "failed"
        elif completed and steps >= max_steps:
            status = "completed"
        else:
            status = "stopped early"
        config = {path: result.config.get(path) for path in space}
        rows.append(
            {
                "trial_id": trial_id,
                "config": config,
                "status": status,
                "stopped_early": status == "stopped early",
                "final_metric": None if final is None else float(final),
                "best_metric": better(v for _, v in history[metric]) if history[metric] else None,
                "steps": steps,
                "wall_s": round(float(last.get("time_total_s") or 0.0), 1),
                "history": history,
                "dir": storage.join(trials_dir, trial_id),
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def pick_best(rows: list[dict], mode: str) -> dict | None:
    """The best trial by its final metric among those that ran to the end (their weights exist and the
    best recipe reproduces them); any trial with a metric when none did."""
    pool = [r for r in rows if r["status"] == "completed" and r["final_metric"] is not None] or [
        r for r in rows if r["final_metric"] is not None
    ]
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda r: r["final_metric"])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(rows: list[dict], recipe: Recipe, space: dict) -> str:
    """A Markdown table of the trials (also printed to the console)."""
    metric = recipe.tune.metric
    names = [p.removeprefix("train.") for p in space]
    head = [
        "trial",
        *names,
        *(["lora.alpha"] if ALPHA_RATIO in space else []),
        f"final {metric}",
        f"best {metric}",
        "steps",
        "stopped early",
        "status",
        "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial_id"], *(_cell(r["config"][p]) for p in space)]
        if ALPHA_RATIO in space:
            cells.append(_cell(_alpha(r, recipe)))
        cells += [
            _cell(r["final_metric"]),
            _cell(r["best_metric"]),
            f"{r['steps']}/{recipe.train.max_steps}",
            "yes" if r["stopped_early"] else "no",
            r["status"],
            _cell(r["wall_s"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _alpha(row: dict, recipe: Recipe) -> float | None:
    ratio = row["config"].get(ALPHA_RATIO)
    rank = row["config"].get("train.lora.rank", recipe.train.lora.rank)
    return None if ratio is None else float(ratio) * int(rank)


def plot(rows: list[dict], recipe: Recipe, space: dict, target: str) -> None:
    """The metric against each searched field, plus the metric by step of every trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = recipe.tune.metric
    axes_for = list(space) + (["train.lora.alpha"] if ALPHA_RATIO in space else [])
    count = len(axes_for) + 1
    columns = min(count, 3)
    fig, axes = plt.subplots(
        math.ceil(count / columns), columns, figsize=(4.2 * columns, 3.4 * math.ceil(count / columns)), squeeze=False
    )
    flat = list(axes.flat)
    styles = {"completed": ("o", "tab:blue"), "stopped early": ("x", "tab:red"), "failed": ("s", "tab:gray")}
    scored = [r for r in rows if r["final_metric"] is not None]
    for ax, path in zip(flat, axes_for):
        values = [(_alpha(r, recipe) if path == "train.lora.alpha" else r["config"][path]) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values}) if not numeric else []
        for r, v in zip(scored, values):
            marker, color = styles[r["status"]]
            ax.scatter(
                v if numeric else labels.index(str(v)), r["final_metric"], marker=marker, color=color, label=r["status"]
            )
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif space.get(path) is not None and space[path].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(
            path.removeprefix("train.")
            + (" (= ratio x rank)" if path == "train.lora.alpha" and ALPHA_RATIO in space else "")
        )
        ax.set_ylabel(f"{metric} at the last report")
        ax.grid(alpha=0.3)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
        ax.legend(handles.values(), handles.keys(), fontsize=7)
    curves = flat[len(axes_for)]
    for r in rows:
        if r["history"][metric]:
            at, measured = zip(*r["history"][metric])
            curves.plot(at, measured, marker=".", color=styles[r["status"]][1], alpha=0.8)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel(metric)
    curves.set_title("trials (red: stopped by ASHA)", fontsize=9)
    curves.grid(alpha=0.3)
    for ax in flat[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(target, buffer.getvalue())


def _absolute_source(recipe: Recipe, source):
    """A `data.sources` entry (a string or a source section's dict) with its path made absolute."""
    if isinstance(source, str):
        return recipe.resolve_source(source)
    return {**source, "path": recipe.resolve_source(source["path"])} if source.get("path") else source


def best_recipe(recipe: Recipe, best: dict) -> dict:
    """The recipe with the best trial's train section, ready to run from any folder: paths made
    absolute, the tune stage and section left out (running it trains the winner, it does not search)."""

    winner = trial_recipe(recipe.resolved(), best["config"], recipe.source_path)
    raw = winner.resolved()
    raw.pop("tune", None)
    raw["run"]["output_dir"] = storage.absolute(recipe.run.output_dir)
    stages = [s for s in recipe.run.stages if s != "tune"]
    if "train" not in stages:  # the winner is trained where the search was, after its data stages
        stages.insert(sum(s in ("prepare", "distill") for s in stages), "train")
    raw["run"]["stages"] = stages
    raw["data"]["sources"] = [_absolute_source(recipe, source) for source in raw["data"]["sources"]]
    if raw["evaluate"].get("schema_file"):
        raw["evaluate"]["schema_file"] = recipe.resolve_source(raw["evaluate"]["schema_file"])
    if raw["train"].get("deepspeed") and raw["train"]["deepspeed"].get("config_file"):
        raw["train"]["deepspeed"]["config_file"] = recipe.resolve_source(raw["train"]["deepspeed"]["config_file"])
    raw["guard"]["sources"] = [recipe.resolve_source(s) for s in recipe.guard.sources]
    return raw


def finish(recipe: Recipe, rows: list[dict], space: dict, out_dir: str, fingerprint: str, seconds: float) -> dict:
    """Write the table, plot, best recipe, MLflow runs and the summary; returns the summary."""
    from raytune_app import config as recipe_config
    from raytune_app.tune import tracking

    best = pick_best(rows, recipe.tune.mode)
    if best is None:
        raise DataError(
            f"no trial reported {recipe.tune.metric}; see the trial errors under {out_dir}/search "
            "(check tune.metric: trials report eval_loss and the trainer's other eval_* metrics)"
        )
    text = table(rows, recipe, space)
    print(text, flush=True)
    storage.write_text(
        storage.join(out_dir, "trials.md"),
        f"# Trials of `{recipe.run.name}` ({recipe.tune.algorithm}, "
        f"metric {recipe.tune.metric}, {recipe.tune.mode})\n\n{text}\n",
    )
    storage.write_text(storage.join(out_dir, "trials.json"), json.dumps(rows, indent=2) + "\n")
    plot(rows, recipe, space, storage.join(out_dir, "tune_plot.png"))
    best_path = storage.join(out_dir, "best_recipe.yaml")
    header = (
        f"# The best trial ({best['trial_id']}, {recipe.tune.metric} {best['final_metric']:.6g}) of the search "
        f"in {out_dir}.\n# raytune-app run --recipe {best_path}\n"
    )
    storage.write_text(best_path, header + yaml.safe_dump(best_recipe(recipe, best), sort_keys=False))
    recipe_config.load(best_path)  # it must validate as written

    budget = len(rows) * (recipe.train.max_steps or 0)
    total = sum(r["steps"] for r in rows)
    summary = {
        "stage": "tune",
        "fingerprint": fingerprint,
        "metric": recipe.tune.metric,
        "mode": recipe.tune.mode,
        "algorithm": recipe.tune.algorithm,
        "asha": recipe.tune.early_stopping.asha,
        "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "steps": {"total": total, "budget": budget, "saved_fraction": round(1 - total / budget, 4) if budget else 0.0},
        "best": {k: best[k] for k in ("trial_id", "config", "final_metric", "best_metric", "steps", "status", "dir")},
        "best_recipe": best_path,
        "best_weights": storage.join(best["dir"], "adapter" if recipe.train.finetuning != "full" else "model")
        if best["status"] == "completed"
        else None,
        "table": storage.join(out_dir, "trials.md"),
        "plot": storage.join(out_dir, "tune_plot.png"),
        "seconds_this_session": round(seconds, 1),
    }
    summary.update(tracking.log_search(recipe, rows, best, summary, out_dir))
    storage.write_text(storage.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary
