"""Guard quality on a public set nobody here wrote: our fine-tuned encoder vs TF-IDF + logistic regression.

    .venv/bin/python benchmarks/guard_quality.py [--recipe recipes/guard.yaml] [--data ../shared/data/promptshield/val.jsonl]

Both classifiers learn from the same rows (the guard recipe's training set: authored + bastioncorpus)
with the same hash split, and both get their threshold on the same validation rows for the same
target false-positive rate (guard.target_fpr). Then both score the public set, which neither saw:
AUC, TPR at 1% FPR (threshold chosen on the public set itself: the ranking quality), and at the
shipped threshold the FPR and the attack success rate (attacks let through). Latency is per prompt at
batch 1 on CPU. The guard is trained first when the recipe's run has none yet.
Skips cleanly when the public set is absent (a user's machine has no ../shared/data).
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


def tfidf_baseline(train_rows, val_rows, target_fpr: float):
    """(score function, threshold) of a word + character n-gram TF-IDF logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    from raytune_app.guard.metrics import threshold_for_fpr

    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))
    model = make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0))
    model.fit([r["text"] for r in train_rows], [r["label"] for r in train_rows])
    score = lambda texts: model.predict_proba(texts)[:, 1].tolist()  # noqa: E731
    threshold = threshold_for_fpr(score([r["text"] for r in val_rows]), [r["label"] for r in val_rows], target_fpr)
    return score, threshold


def measure(score, threshold, rows) -> dict:
    import numpy as np

    from raytune_app.guard.metrics import detection_metrics

    score([rows[0]["text"]])
    scores, latencies = [], []
    for row in rows:
        began = time.perf_counter()
        scores += score([row["text"]])
        latencies.append((time.perf_counter() - began) * 1000)
    result = detection_metrics(scores, [r["label"] for r in rows], threshold)
    p50, p99 = np.percentile(latencies, [50, 99])
    return result | {"latency_ms_p50": float(p50), "latency_ms_p99": float(p99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "guard.yaml"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "promptshield" / "val.jsonl"))
    parser.add_argument("--text-field", default="prompt")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        print(f"skipped: {args.data} is not here (the public sets live in ../shared/data)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from raytune_app import config
    from raytune_app.guard import data
    from raytune_app.guard.model import Guard, train_guard

    recipe = config.load(args.recipe)
    folder = recipe.stage_dir("guard")
    if not os.path.exists(os.path.join(folder, "guard.json")):
        import ray

        ray.init(include_dashboard=False, logging_level="ERROR")
        train_guard(recipe)
        ray.shutdown()
    train_rows, val_rows = data.split(data.training_rows(recipe), recipe.guard.val_fraction)
    public = data.read_labelled(args.data, args.text_field, "label")
    torch.set_num_threads(os.cpu_count())
    guard = Guard.load(folder)
    baseline_score, baseline_threshold = tfidf_baseline(train_rows, val_rows, recipe.guard.target_fpr)
    results = {"TF-IDF + logistic regression": measure(baseline_score, baseline_threshold, public),
               f"guard ({recipe.guard.base})": measure(guard.scores, guard.threshold, public)}
    print(f"machine: {os.cpu_count()} CPUs; public set {args.data}: {len(public)} rows "
          f"({sum(r['label'] for r in public)} attacks); trained on {len(train_rows)} rows, threshold for FPR <= "
          f"{recipe.guard.target_fpr} on {len(val_rows)} validation rows")
    print(f"{'classifier':<40} {'AUC':>6} {'TPR@1%FPR':>9} {'FPR':>7} {'TPR':>6} {'attack success':>14} {'p50 ms':>7} {'p99 ms':>7}")
    for name, r in results.items():
        print(f"{name:<40} {r['auc']:>6.3f} {r['tpr_at_fpr_1pct']:>9.3f} {r['fpr']:>7.4f} {r['tpr']:>6.3f} "
              f"{r['attack_success_rate']:>14.3f} {r['latency_ms_p50']:>7.2f} {r['latency_ms_p99']:>7.2f}")
    print(json.dumps({k: {m: v for m, v in r.items() if m != "recall_by_attack_type"} for k, r in results.items()}))


if __name__ == "__main__":
    main()
