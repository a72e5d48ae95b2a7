"""Detection metrics of the guard, as plain functions over scores and labels (no Ray, no torch).

    threshold = threshold_for_fpr(val_scores, val_labels, target_fpr=0.01)
    report = detection_metrics(scores, labels, threshold, attack_types)

Scores are the classifier's attack probabilities; label 1 is an attack, 0 benign. The threshold is
the lowest score that keeps the false-positive rate on benign validation prompts at or under the
target, so the shipped guard blocks as many attacks as that budget of false alarms allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raytune_app.errors import DataError


def threshold_for_fpr(
    scores: Sequence[float], labels: Sequence[int], target_fpr: float, weights: Sequence[float] | None = None
) -> float:
    """The smallest threshold t (block when score >= t) whose FPR on these benign rows is <= target.

    `weights` (one per row; only the benign rows' count): the FPR is the blocked benign rows' share of the
    benign weight instead of their share of the count, so a kind of benign prompt can count for more or less
    than its number of rows (guard.threshold_source_weights). Equal weights give the plain FPR."""
    is_benign = np.asarray(labels, dtype=int) == 0
    benign_scores = np.asarray(scores, dtype=float)[is_benign]
    if benign_scores.size == 0:
        raise DataError("choosing a threshold for a false-positive rate needs benign (label 0) validation rows")
    order = np.argsort(-benign_scores, kind="stable")
    benign = benign_scores[order]
    if weights is None:
        allowed = int(np.floor(target_fpr * benign.size))  # benign rows that may score at or above t
    else:
        weight = np.asarray(weights, dtype=float)[is_benign][order]
        if (weight < 0).any() or weight.sum() <= 0:
            raise DataError("threshold weights must be non-negative with a positive total on the benign rows")
        # The most top-scoring benign rows whose weight together stays within the budget (a score tied with
        # the first row over budget is not blocked either: t lies just above it).
        allowed = int((np.cumsum(weight) <= target_fpr * weight.sum() * (1 + 1e-12)).sum())
    if allowed >= benign.size:
        return float(benign[-1])
    # Block strictly above the (allowed+1)-th highest benign score: at most `allowed` benign rows pass t.
    return float(np.nextafter(benign[allowed], np.inf))


def source_weights(sources: Sequence[str], labels: Sequence[int], shares: dict[str, float]) -> list[float] | None:
    """Per-row weights for threshold_for_fpr from guard.threshold_source_weights: each named source's benign
    rows together weigh its share, the other sources' benign rows share the rest equally; attacks weigh 0 (they
    do not enter the FPR). None when `shares` is empty. A named source without benign rows here gives its
    share to the rest; when nothing is left unnamed, the named shares are scaled up to the whole."""
    if not shares:
        return None
    benign_count: dict[str, int] = {}
    for source, label in zip(sources, labels):
        if label == 0:
            benign_count[source] = benign_count.get(source, 0) + 1
    present = {s: p for s, p in shares.items() if benign_count.get(s)}
    rest_rows = sum(n for s, n in benign_count.items() if s not in present)
    rest_share = max(0.0, 1.0 - sum(present.values())) if rest_rows else 0.0
    total = sum(present.values()) + rest_share
    if total <= 0:
        return None
    out = []
    for source, label in zip(sources, labels):
        if label != 0:
            out.append(0.0)
        elif source in present:
            out.append(present[source] / total / benign_count[source])
        else:
            out.append(rest_share / total / rest_rows)
    return out


def _rate(count: float, total: int) -> float | None:
    return round(float(count) / total, 6) if total else None


def detection_metrics(
    scores: Sequence[float],
    labels: Sequence[int],
    threshold: float,
    attack_types: Sequence[str | None] | None = None,
) -> dict:
    """AUC, TPR at 1% FPR, and the confusion-based rates at the shipped threshold."""
    from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

    scores_, labels_ = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    blocked = scores_ >= threshold
    attacks, benign = labels_ == 1, labels_ == 0
    both_classes = attacks.any() and benign.any()
    out: dict[str, Any] = {
        "n": int(labels_.size),
        "attacks": int(attacks.sum()),
        "benign": int(benign.sum()),
        "threshold": round(float(threshold), 6),
        "auc": round(float(roc_auc_score(labels_, scores_)), 6) if both_classes else None,
        "tpr_at_fpr_1pct": None,
        "tpr": _rate((blocked & attacks).sum(), int(attacks.sum())),
        "fpr": _rate((blocked & benign).sum(), int(benign.sum())),
        "f1": round(float(f1_score(labels_, blocked.astype(int), zero_division=0)), 6) if labels_.size else None,
        "mcc": round(float(matthews_corrcoef(labels_, blocked.astype(int))), 6) if labels_.size else None,
        "attack_success_rate": _rate((~blocked & attacks).sum(), int(attacks.sum())),
    }
    if both_classes:
        at_1pct = threshold_for_fpr(scores_, labels_, 0.01)
        out["tpr_at_fpr_1pct"] = _rate((scores_[attacks] >= at_1pct).sum(), int(attacks.sum()))
    if attack_types is not None:
        per_type: dict[str, list[bool]] = {}
        for kind, label, hit in zip(attack_types, labels_, blocked):
            if label == 1 and kind is not None:
                per_type.setdefault(str(kind), []).append(bool(hit))
        out["recall_by_attack_type"] = {
            k: {"n": len(v), "recall": _rate(sum(v), len(v))} for k, v in sorted(per_type.items())
        }
        alarms: dict[str, list[bool]] = {}  # the benign side: which kinds of benign prompt raise false alarms
        for kind, label, hit in zip(attack_types, labels_, blocked):
            if label == 0 and kind is not None:
                alarms.setdefault(str(kind), []).append(bool(hit))
        if alarms:
            out["fpr_by_benign_type"] = {
                k: {"n": len(v), "fpr": _rate(sum(v), len(v))} for k, v in sorted(alarms.items())
            }
    return out
