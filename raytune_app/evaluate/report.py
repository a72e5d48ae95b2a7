"""The human report of an evaluation: report.md with PNG plots beside it.

    write_report(summary, recipe, out_dir, loss_curve=".../train/loss_curve.png")

Plots: the task's headline metrics per model as grouped bars (metrics.png), the training loss curve
(copied from the train stage so the folder stands alone), the reliability diagram for classification
(calibration.png) and per-example latency per model (latency.png). Tables: every metric per model,
latency, per-group recall with the gap, and the confusion matrix for classification.
"""

from __future__ import annotations

import io

from raytune_app import storage
from raytune_app.config import Recipe

RATE_METRICS = {
    "structured": [
        "json_parse_rate",
        "schema_valid_rate",
        "field_precision",
        "field_recall",
        "field_f1",
        "exact_match",
    ],
    "classification": ["accuracy", "macro_f1", "mcc", "valid_label_rate"],
    "free_text": ["exact_match", "normalised_match"],
}
TABLE_METRICS = {
    "structured": RATE_METRICS["structured"],
    "classification": RATE_METRICS["classification"] + ["ece"],
    "free_text": RATE_METRICS["free_text"] + ["length_ratio"],
}


def _save(fig, uri: str) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(uri, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_bars(summary: dict, uri: str) -> None:
    plt = _pyplot()
    keys = RATE_METRICS[summary["task"]]
    names = list(summary["models"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 2, 3.6))
    for i, name in enumerate(names):
        values = [summary["models"][name].get(k) or 0.0 for k in keys]
        positions = [k + (i - (len(names) - 1) / 2) * width for k in range(len(keys))]
        bars = ax.bar(positions, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("rate")
    ax.set_title(f"{summary['task']} metrics on {summary['data']} ({summary['examples']} examples)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, uri)


def calibration_diagram(summary: dict, uri: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for name, result in summary["models"].items():
        bins = result.get("calibration") or []
        if bins:
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                marker="o",
                label=f"{name} (ECE {result['ece']:.3f})",
            )
    ax.set_xlabel("confidence (probability of the chosen label)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, uri)


def latency_plot(latencies: dict[str, list[float]], uri: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(latencies) + 2, 3.2))
    ax.boxplot(list(latencies.values()), tick_labels=list(latencies))
    ax.set_ylabel("seconds per example (its generate call)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, uri)


EXAMPLES_SHOWN = 3


def _quote(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " [...]"
    return "\n".join("    " + line for line in text.splitlines() or [""])


def _examples(predictions, names: list[str], count: int) -> list[str]:
    """The first few examples with every model's reply, so a reader sees what the numbers mean."""
    rows = predictions.to_pylist()
    by_example: dict[str, dict] = {}
    for row in rows:
        by_example.setdefault(row["example"], {"row": row, "replies": {}})["replies"][row["model"]] = row["prediction"]
    lines = [
        "## Examples",
        "",
        f"The first {min(count, len(by_example))} examples, each model's reply as generated.",
        "",
    ]
    for i, entry in enumerate(list(by_example.values())[:count], start=1):
        prompt = entry["row"]["prompt"][-1]["content"] if entry["row"]["prompt"] else ""
        lines += [
            f"### Example {i}",
            "",
            "Prompt (last turn):",
            "",
            _quote(prompt),
            "",
            "Reference:",
            "",
            _quote(entry["row"]["gold"]),
            "",
        ]
        for name in names:
            lines += [f"`{name}`:", "", _quote(entry["replies"].get(name, "")), ""]
    return lines


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def write_report(summary: dict, recipe: Recipe, out_dir: str, loss_curve: str) -> str:
    """Write report.md and its plots into out_dir (beside predictions.parquet); returns the report's URI."""
    import pyarrow.parquet as pq

    task, names = summary["task"], list(summary["models"])
    metric_bars(summary, storage.join(out_dir, "metrics.png"))
    fs, path = storage.filesystem(storage.join(out_dir, "predictions.parquet"))
    predictions = pq.read_table(
        path, filesystem=fs, columns=["model", "example", "prompt", "gold", "prediction", "latency_s"]
    )
    latencies: dict[str, list[float]] = {n: [] for n in names}
    for model, seconds in zip(predictions.column("model").to_pylist(), predictions.column("latency_s").to_pylist()):
        latencies[model].append(seconds)
    latency_plot(latencies, storage.join(out_dir, "latency.png"))

    ev = recipe.evaluate
    decoding = (
        f"greedy decoding up to {ev.max_new_tokens} new tokens"
        if ev.temperature == 0
        else f"sampling at temperature {ev.temperature}, up to {ev.max_new_tokens} new tokens"
    )
    lines = [
        f"# Evaluation of `{recipe.run.name}`",
        "",
        f"Task **{task}** on {summary['data']} ({summary['examples']} examples); base model "
        f"`{summary['base_model']}`; {decoding}. Created {summary['created']}.",
        "",
        "## Metrics",
        "",
    ]
    lines += _table(
        ["metric", *names], [[k, *(summary["models"][n].get(k) for n in names)] for k in TABLE_METRICS[task]]
    )
    if any("constrained" in summary["models"][n] for n in names):
        lines += [
            "",
            "Decoded constrained to the JSON Schema (vLLM structured outputs, `evaluate.schema_constrained`):",
            "",
        ]
        lines += _table(
            ["metric", *names],
            [[k, *(summary["models"][n].get("constrained", {}).get(k) for n in names)] for k in TABLE_METRICS[task]],
        )
    lines += ["", "![metrics](metrics.png)", ""]
    if storage.exists(loss_curve):
        storage.write_bytes(storage.join(out_dir, "loss_curve.png"), storage.read_bytes(loss_curve))
        lines += ["## Training", "", "![loss curve](loss_curve.png)", ""]
    how = (
        "the vLLM engine's time from taking the request to its last token (continuous batching)"
        if summary.get("backend") == "vllm"
        else "the time of the batched `generate` call it was part of"
    )
    lines += [
        "## Latency",
        "",
        f"Generated with {summary.get('backend', 'transformers')}; an example's latency is {how}.",
        "",
    ]
    lines += _table(
        ["model", "p50 s", "p95 s", "p99 s", "tokens/s", "examples/s"],
        [
            [
                n,
                *(
                    summary["models"][n]["latency"][k]
                    for k in ("p50_s", "p95_s", "p99_s", "tokens_per_second", "examples_per_second")
                ),
            ]
            for n in names
        ],
    )
    lines += ["", "![latency](latency.png)", ""]
    if any("groups" in summary["models"][n] for n in names):
        column = next(summary["models"][n]["groups"]["column"] for n in names if "groups" in summary["models"][n])
        groups = sorted({g for n in names for g in summary["models"][n].get("groups", {}).get("per_group", {})})
        lines += [
            f"## Per group (`{column}`)",
            "",
            "Recall within each group and the largest gap between two groups.",
            "",
        ]
        rows = [
            [g, *(summary["models"][n]["groups"]["per_group"].get(g, {}).get("recall") for n in names)] for g in groups
        ]
        rows.append(["**gap**", *(summary["models"][n]["groups"]["gap"] for n in names)])
        lines += _table(["group", *names], rows) + [""]
    if task == "classification":
        calibration_diagram(summary, storage.join(out_dir, "calibration.png"))
        lines += ["## Calibration", "", "![calibration](calibration.png)", ""]
        for n in names:
            matrix = summary["models"][n]["confusion_matrix"]
            lines += [f"Confusion matrix of `{n}` (rows: gold, columns: predicted)", ""]
            lines += _table(
                ["gold \\ predicted", *matrix["labels"]],
                [[label, *row] for label, row in zip(summary["labels"], matrix["rows"])],
            ) + [""]
    lines += _examples(predictions, names, EXAMPLES_SHOWN)
    target = storage.join(out_dir, "report.md")
    storage.write_text(target, "\n".join(lines) + "\n")
    return target
