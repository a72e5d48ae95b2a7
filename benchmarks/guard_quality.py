"""Guard quality on a public set nobody here wrote: our fine-tuned encoder vs TF-IDF + logistic regression,
and the guard's int8 CPU path vs its float32 model (quality and batch-1 latency, interleaved).

    .venv/bin/python benchmarks/guard_quality.py [--recipe recipes/guard.yaml]
        [--data ../shared/data/promptshield/val.jsonl] [--repeats 3] [--threads N]
        [--in-domain ../shared/data/promptshield/train.jsonl]

Both classifiers learn from the same rows (the guard recipe's training set: authored + bastioncorpus)
with the same hash split, and both get their threshold on the same validation rows for the same
target false-positive rate (guard.target_fpr). Then both score the public set, which neither saw:
AUC, TPR at 1% FPR (threshold chosen on the public set itself: the ranking quality), and at the
shipped threshold the FPR and the attack success rate (attacks let through). The guard is trained
first when the recipe's run has none yet.

Latency is per prompt at batch 1 on CPU. The machine is shared, so the guard's two precisions are
timed interleaved (for every prompt: the baseline, float32, int8, int8 on one thread) over `--repeats` passes,
and the table gives the median over passes of each pass's p50 / p99, plus the int8 / float32 ratio.

`--in-domain FILE` adds a separate row: a guard that also trains on FILE (the public set's own train
split: in-distribution data the project does not ship). It shows what in-domain data adds; it is
not the shipped guard and does not count for the aim.
Skips cleanly when the public set is absent (a user's machine has no ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tfidf_baseline(train_rows, val_rows, target_fpr: float):
    """(score function, threshold) of a word + character n-gram TF-IDF logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    from raytune_app.guard.metrics import threshold_for_fpr

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
    )
    model = make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0))
    model.fit([r["text"] for r in train_rows], [r["label"] for r in train_rows])
    score = lambda texts: model.predict_proba(texts)[:, 1].tolist()  # noqa: E731
    threshold = threshold_for_fpr(score([r["text"] for r in val_rows]), [r["label"] for r in val_rows], target_fpr)
    return score, threshold


def interleaved(sides: dict, rows: list[dict], repeats: int) -> dict:
    """{side: {"scores", "p50s", "p99s"}}: every prompt scored by every side in turn, `repeats` passes."""
    import numpy as np

    for score in sides.values():
        score([rows[0]["text"]])  # warm-up: the first call allocates
    out = {name: {"scores": [], "p50s": [], "p99s": []} for name in sides}
    for rep in range(repeats):
        latencies = {name: [] for name in sides}
        for row in rows:
            for name, score in sides.items():
                began = time.perf_counter()
                value = score([row["text"]])
                latencies[name].append((time.perf_counter() - began) * 1000)
                if rep == 0:
                    out[name]["scores"] += value
        for name, values in latencies.items():
            p50, p99 = np.percentile(values, [50, 99])
            out[name]["p50s"].append(float(p50))
            out[name]["p99s"].append(float(p99))
        print(
            f"[bench] pass {rep + 1}/{repeats}: " + ", ".join(f"{n} p99 {out[n]['p99s'][-1]:.1f} ms" for n in sides),
            file=sys.stderr,
            flush=True,
        )
    return out


def train_if_missing(recipe) -> str:
    from raytune_app.guard.model import train_guard

    folder = recipe.stage_dir("guard")
    if not os.path.exists(os.path.join(folder, "guard.json")):
        import ray

        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        train_guard(recipe)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "guard.yaml"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "promptshield" / "val.jsonl"))
    parser.add_argument("--text-field", default="prompt")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved latency passes over the public set")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the guard (CPU)")
    parser.add_argument("--in-domain", metavar="FILE", help="also train a guard on FILE too (separate, labelled row)")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        print(f"skipped: {args.data} is not here (the public sets live in ../shared/data)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from raytune_app import config
    from raytune_app.guard import data
    from raytune_app.guard.metrics import detection_metrics, threshold_for_fpr
    from raytune_app.guard.model import Guard

    recipe = config.load(args.recipe)
    folder = train_if_missing(recipe)
    train_rows, val_rows = data.split(data.training_rows(recipe), recipe.guard.val_fraction)
    public = data.read_labelled(args.data, args.text_field, "label")
    torch.set_num_threads(args.threads)
    shipped = Guard.load(folder)  # the precision guard.json names (int8 for guards trained with inference: int8)
    other = Guard.load(folder, precision="float32" if shipped.precision == "int8" else "int8")
    # The comparison precision gets its own threshold, chosen the same way on the same validation rows.
    other.threshold = threshold_for_fpr(
        [other.scores([r["text"]])[0] for r in val_rows], [r["label"] for r in val_rows], recipe.guard.target_fpr
    )
    baseline_score, baseline_threshold = tfidf_baseline(train_rows, val_rows, recipe.guard.target_fpr)
    sides = {
        "TF-IDF + logistic regression": (baseline_score, baseline_threshold),
        f"guard {other.precision}": (other.scores, other.threshold),
        f"guard {shipped.precision} (shipped)": (shipped.scores, shipped.threshold),
    }
    if args.threads > 1:  # serving runs the guard with one thread: time that too (same model, same scores)

        def one_thread(texts, score=shipped.scores):
            torch.set_num_threads(1)
            try:
                return score(texts)
            finally:
                torch.set_num_threads(args.threads)

        sides[f"guard {shipped.precision}, 1 thread (as served)"] = (one_thread, shipped.threshold)
    if args.in_domain:
        extra = config.load(
            args.recipe,
            [
                f"run.name={recipe.run.name}-in-domain",
                f"guard.sources=[{os.path.abspath(args.in_domain)}]",
                "guard.text_field=prompt",
                f"guard.registered_name={recipe.guard.registered_name}-in-domain",
            ],
        )
        in_domain = Guard.load(train_if_missing(extra))
        sides["guard + public train split (not shipped)"] = (in_domain.scores, in_domain.threshold)
    timed = interleaved({name: score for name, (score, _) in sides.items()}, public, args.repeats)
    labels = [r["label"] for r in public]
    results = {}
    for name, (_, threshold) in sides.items():
        t = timed[name]
        results[name] = detection_metrics(t["scores"], labels, threshold, [r["attack_type"] for r in public]) | {
            "latency_ms_p50": statistics.median(t["p50s"]),
            "latency_ms_p99": statistics.median(t["p99s"]),
            "p99_runs": [round(v, 2) for v in t["p99s"]],
        }
    fp, q = results[f"guard {other.precision}"], results[f"guard {shipped.precision} (shipped)"]
    print(
        f"machine: {os.cpu_count()} CPUs, {args.threads} torch threads; public set {args.data}: {len(public)} rows "
        f"({sum(labels)} attacks); trained on {len(train_rows)} rows, thresholds for FPR <= {recipe.guard.target_fpr} "
        f"on {len(val_rows)} validation rows; latency: median of {args.repeats} interleaved passes"
    )
    print(
        f"{'classifier':<42} {'AUC':>6} {'TPR@1%FPR':>9} {'FPR':>7} {'TPR':>6} {'attack success':>14} "
        f"{'p50 ms':>7} {'p99 ms':>7}"
    )
    for name, r in results.items():
        print(
            f"{name:<42} {r['auc']:>6.3f} {r['tpr_at_fpr_1pct']:>9.3f} {r['fpr']:>7.4f} {r['tpr']:>6.3f} "
            f"{r['attack_success_rate']:>14.3f} {r['latency_ms_p50']:>7.2f} {r['latency_ms_p99']:>7.2f}"
        )
    print(
        f"int8 / float32 latency: p50 x{q['latency_ms_p50'] / fp['latency_ms_p50']:.2f}, "
        f"p99 x{q['latency_ms_p99'] / fp['latency_ms_p99']:.2f}"
        if shipped.precision == "int8"
        else ""
    )
    print(
        "shipped guard, recall by public attack type (read after the run, never tuned on): "
        + ", ".join(
            f"{k} {v['recall']:.2f} (n={v['n']})" for k, v in q["recall_by_attack_type"].items() if k != "benign"
        )
    )
    print(
        json.dumps(
            {
                k: {m: v for m, v in r.items() if m not in ("recall_by_attack_type", "fpr_by_benign_type")}
                for k, r in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
