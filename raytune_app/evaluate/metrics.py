"""Task metrics of the evaluate stage, as plain functions over lists (no Ray, no torch).

    from raytune_app.evaluate import metrics
    metrics.structured(predictions, golds, schema)       # JSON parse / schema-valid / field P-R-F1 / exact
    metrics.classification(predictions, golds, labels, probabilities)   # accuracy, macro-F1, MCC, ECE
    metrics.free_text(predictions, golds)                # exact / normalised match, length ratio
    metrics.latency(seconds, new_tokens, wall_seconds)   # p50 / p95 / p99, tokens/s
    metrics.group_gap(recalls_by_example, groups)        # largest recall difference between groups

Every function returns plain JSON-ready numbers and never NaN: a rate over zero examples is None.
The per-example helpers (`score_structured`, ...) give the row-level values the predictions Parquet
keeps, so a reader can see which examples moved a metric.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from raytune_app.errors import DataError

# A reply wrapped in a Markdown code fence (```json ... ```) still counts as parsed: chat models do it
# by habit and every JSON consumer strips the fence first. Anything else around the object does not.
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def _rate(count: float, total: int) -> float | None:
    return round(count / total, 6) if total else None


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value) for a model reply that should be one JSON value and nothing else."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def _normalise_value(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)  # 2 and 2.0 are the same quantity
    return json.dumps(value, sort_keys=True)


def leaf_fields(value: Any, path: str = "") -> Counter:
    """The (path, value) leaves of a JSON value, list positions folded to `[]` (a multiset).

    Folding list positions makes field scores independent of item order: a model that lists the same
    two items the other way round loses nothing. Null leaves count: answering null where the gold is
    null is part of the task (the fact is absent) and answering a value there is a false positive.
    """
    leaves: Counter = Counter()
    if isinstance(value, dict):
        for key, item in value.items():
            leaves.update(leaf_fields(item, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for item in value:
            leaves.update(leaf_fields(item, f"{path}[]"))
    else:
        leaves[(path, _normalise_value(value))] += 1
    return leaves


def score_structured(prediction: str, gold: str, validator=None) -> dict:
    """Row-level scores of one structured reply against the gold JSON text."""
    parsed, value = parse_json(prediction)
    gold_ok, gold_value = parse_json(gold)
    if not gold_ok:
        raise DataError(f"the gold answer is not JSON: {gold[:80]!r}; structured evaluation needs JSON answers")
    predicted = leaf_fields(value) if parsed else Counter()
    expected = leaf_fields(gold_value)
    matched = sum((predicted & expected).values())
    return {
        "parsed": parsed,
        "schema_valid": bool(parsed and validator is not None and validator.is_valid(value)),
        "exact_match": bool(parsed and value == gold_value),
        "fields_matched": matched,
        "fields_predicted": sum(predicted.values()),
        "fields_gold": sum(expected.values()),
    }


def precision_recall_f1(matched: float, predicted: float, gold: float) -> dict:
    precision = matched / predicted if predicted else 0.0
    recall = matched / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6)}


def structured(rows: Sequence[dict], with_schema: bool) -> dict:
    """Aggregate `score_structured` rows: rates, and micro-averaged field precision/recall/F1."""
    n = len(rows)
    totals = {k: sum(r[k] for r in rows) for k in ("fields_matched", "fields_predicted", "fields_gold")}
    fields = precision_recall_f1(totals["fields_matched"], totals["fields_predicted"], totals["fields_gold"])
    return {
        "examples": n,
        "json_parse_rate": _rate(sum(r["parsed"] for r in rows), n),
        "schema_valid_rate": _rate(sum(r["schema_valid"] for r in rows), n) if with_schema else None,
        "exact_match": _rate(sum(r["exact_match"] for r in rows), n),
        "field_precision": fields["precision"] if n else None,
        "field_recall": fields["recall"] if n else None,
        "field_f1": fields["f1"] if n else None,
    }


# --------------------------------------------------------------------------------- classification

OTHER = "(other)"


def match_label(text: str, labels: Sequence[str]) -> str:
    """The label a generated reply names (case and surrounding punctuation ignored), else OTHER."""
    cleaned = text.strip().strip(string.punctuation + " \n").casefold()
    for label in labels:
        if cleaned == label.casefold():
            return label
    return OTHER


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict:
    """ECE over equal-width confidence bins: sum over bins of (bin share) x |accuracy - mean confidence|.

    Returns the ECE and the per-bin table (for the reliability diagram); empty bins are left out.
    """
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return {"ece": None, "bins": []}
    # Bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 falls in the first bin.
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        accuracy, confidence, share = hit[mask].mean(), conf[mask].mean(), mask.mean()
        ece += share * abs(accuracy - confidence)
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": int(mask.sum()),
                "accuracy": round(float(accuracy), 6),
                "confidence": round(float(confidence), 6),
            }
        )
    return {"ece": round(float(ece), 6), "bins": table}


def classification(
    predictions: Sequence[str],
    golds: Sequence[str],
    labels: Sequence[str],
    probabilities: Sequence[Sequence[float]] | None = None,
) -> dict:
    """Accuracy, macro-F1 and MCC of predicted labels; ECE from the label probabilities when given.

    `predictions` are labels (or OTHER for a reply that names none); `probabilities[i][j]` is the
    model's probability of `labels[j]` for example i. ECE scores the most probable label against the
    gold one, with that probability as the confidence.
    """
    from sklearn.metrics import confusion_matrix, f1_score, matthews_corrcoef

    n = len(predictions)
    labels = list(labels)
    columns = labels + ([OTHER] if OTHER in predictions else [])
    out: dict[str, Any] = {
        "examples": n,
        "labels": labels,
        "accuracy": None,
        "macro_f1": None,
        "mcc": None,
        "ece": None,
        "valid_label_rate": None,
        "confusion_matrix": {"labels": columns, "rows": []},
        "calibration": [],
    }
    if n == 0:
        return out
    out["accuracy"] = _rate(sum(p == g for p, g in zip(predictions, golds)), n)
    out["valid_label_rate"] = _rate(sum(p != OTHER for p in predictions), n)
    # Macro-F1 over the task's labels: a reply naming no label is a miss for its gold class.
    out["macro_f1"] = round(float(f1_score(golds, predictions, labels=labels, average="macro", zero_division=0)), 6)
    # sklearn returns 0.0, not NaN, when a row or column of the confusion matrix is all zero
    # (everything predicted as one class): no better than chance.
    out["mcc"] = round(float(matthews_corrcoef(golds, predictions)), 6)
    out["confusion_matrix"]["rows"] = confusion_matrix(golds, predictions, labels=columns).tolist()
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=float)
        best = probs.argmax(axis=1)
        calibration = expected_calibration_error(probs.max(axis=1), [labels[b] == g for b, g in zip(best, golds)])
        out["ece"], out["calibration"] = calibration["ece"], calibration["bins"]
    return out


def per_class_recall(predictions: Sequence[str], golds: Sequence[str]) -> float | None:
    """Mean over the gold classes present of the share of their examples predicted right (macro recall)."""
    classes = sorted(set(golds))
    if not classes:
        return None
    recalls = []
    for label in classes:
        hits = [p == g for p, g in zip(predictions, golds) if g == label]
        recalls.append(sum(hits) / len(hits))
    return round(float(np.mean(recalls)), 6)


# ------------------------------------------------------------------------------------ free text

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the usual lenient answer match."""
    text = text.casefold()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_free_text(prediction: str, gold: str) -> dict:
    gold_words = len(gold.split())
    return {
        "exact_match": prediction.strip() == gold.strip(),
        "normalised_match": normalise_answer(prediction) == normalise_answer(gold),
        "length_ratio": len(prediction.split()) / gold_words if gold_words else None,
    }


def free_text(rows: Sequence[dict]) -> dict:
    n = len(rows)
    ratios = [r["length_ratio"] for r in rows if r["length_ratio"] is not None]
    return {
        "examples": n,
        "exact_match": _rate(sum(r["exact_match"] for r in rows), n),
        "normalised_match": _rate(sum(r["normalised_match"] for r in rows), n),
        "length_ratio": round(float(np.mean(ratios)), 6) if ratios else None,
    }


# ----------------------------------------------------------------------------- latency, groups


def latency(seconds: Sequence[float], new_tokens: Sequence[int], wall_seconds: float) -> dict:
    """Per-example latency percentiles and generated tokens per second of wall time.

    In batched generation an example's latency is the time of the `generate` call it was part of:
    what a caller waiting for that example would have waited.
    """
    values = np.asarray(seconds, dtype=float)
    if values.size == 0:
        return {"p50_s": None, "p95_s": None, "p99_s": None, "tokens_per_second": None, "examples_per_second": None}
    p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99))
    return {
        "p50_s": round(float(p50), 4),
        "p95_s": round(float(p95), 4),
        "p99_s": round(float(p99), 4),
        "tokens_per_second": round(float(np.sum(new_tokens)) / wall_seconds, 2) if wall_seconds > 0 else None,
        "examples_per_second": round(values.size / wall_seconds, 4) if wall_seconds > 0 else None,
    }


def group_gap(groups: Sequence[str | None], recall_of: Callable[[list[int]], float | None]) -> dict:
    """Recall per group and the largest difference between two groups.

    `recall_of(indices)` computes the task's recall over those example indices (field recall for
    structured output, macro recall for classification, normalised-match rate for free text).
    Examples without a group value are left out.
    """
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        if group is not None:
            members.setdefault(str(group), []).append(i)
    per_group = {g: {"examples": len(idx), "recall": recall_of(idx)} for g, idx in sorted(members.items())}
    recalls = {g: v["recall"] for g, v in per_group.items() if v["recall"] is not None}
    if len(recalls) < 2:
        return {"per_group": per_group, "gap": None, "worst_group": None, "best_group": None}
    worst, best = min(recalls, key=lambda g: recalls[g]), max(recalls, key=lambda g: recalls[g])
    return {
        "per_group": per_group,
        "gap": round(recalls[best] - recalls[worst], 6),
        "worst_group": worst,
        "best_group": best,
    }
