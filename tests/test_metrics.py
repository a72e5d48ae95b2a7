"""Metric functions of the evaluate stage against cases worked out by hand (no Ray, no torch)."""

import json
import math

import jsonschema
import pytest

from raytune_app.evaluate import metrics as M

SCHEMA = {
    "type": "object",
    "required": ["id", "items"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["p", "q"],
                "properties": {"p": {"type": "string"}, "q": {"type": "integer"}},
            },
        },
        "note": {"type": ["string", "null"]},
    },
}
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
GOLD = json.dumps({"id": "A1", "items": [{"p": "pen", "q": 2}, {"p": "ink", "q": 1}], "note": None})


def no_nan(value):
    """True when no float anywhere in a nested result is NaN or infinite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(no_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(no_nan(v) for v in value)
    return True


def test_parse_json_accepts_one_value_or_a_fenced_one_and_nothing_else():
    assert M.parse_json(' {"a": 1} ') == (True, {"a": 1})
    assert M.parse_json('```json\n{"a": 1}\n```') == (True, {"a": 1})
    assert M.parse_json('{"a": 1} Hope this helps!')[0] is False
    assert M.parse_json('{"a": 1, "a": 2')[0] is False
    assert M.parse_json("")[0] is False


def test_structured_row_scores_fields_order_free_and_counts_nulls():
    # Same items in the other order and ids in other case/spacing: every leaf matches.
    reordered = json.dumps({"items": [{"p": "ink", "q": 1}, {"p": "pen", "q": 2.0}], "id": "a1 ", "note": None})
    row = M.score_structured(reordered, GOLD, VALIDATOR)
    assert row == {
        "parsed": True,
        "schema_valid": True,
        "exact_match": False,
        "fields_matched": 6,
        "fields_predicted": 6,
        "fields_gold": 6,
    }
    # One wrong quantity, a missing note, an extra key (schema-invalid): 4 of 6 gold leaves matched,
    # 6 leaves predicted (id, 2 products, 2 quantities, extra) -> P 4/6, R 4/6.
    wrong = json.dumps({"id": "A1", "items": [{"p": "pen", "q": 3}, {"p": "ink", "q": 1}], "extra": "x"})
    row = M.score_structured(wrong, GOLD, VALIDATOR)
    assert (row["schema_valid"], row["fields_matched"], row["fields_predicted"], row["fields_gold"]) == (False, 4, 6, 6)
    assert M.score_structured(GOLD, GOLD, VALIDATOR)["exact_match"] is True


def test_structured_aggregate_micro_f1_by_hand():
    rows = [
        M.score_structured(GOLD, GOLD, VALIDATOR),  # 6/6/6
        M.score_structured('{"id": "A1"}', GOLD, VALIDATOR),  # 1/1/6, invalid (no items)
        M.score_structured("not json", GOLD, VALIDATOR),
    ]  # 0/0/6
    result = M.structured(rows, with_schema=True)
    precision, recall = 7 / 7, 7 / 18
    assert result["json_parse_rate"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["schema_valid_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["exact_match"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["field_precision"] == pytest.approx(precision)
    assert result["field_recall"] == pytest.approx(recall, abs=1e-6)
    assert result["field_f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-6)


def test_structured_edge_cases_are_none_or_zero_never_nan():
    empty = M.structured([], with_schema=True)
    assert empty["examples"] == 0 and empty["field_f1"] is None and empty["schema_valid_rate"] is None
    nothing_parsed = M.structured([M.score_structured("", GOLD, VALIDATOR)] * 3, with_schema=True)
    assert nothing_parsed["field_f1"] == 0.0 and nothing_parsed["json_parse_rate"] == 0.0
    assert M.structured([M.score_structured(GOLD, GOLD)], with_schema=False)["schema_valid_rate"] is None
    assert no_nan(empty) and no_nan(nothing_parsed)
    with pytest.raises(ValueError, match="gold answer is not JSON"):
        M.score_structured("{}", "plain text")


def test_mcc_macro_f1_and_confusion_by_hand():
    golds = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "yes", "no", "no", "no", "yes"]
    # TP 2, FN 1, TN 2, FP 1: MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9.
    result = M.classification(preds, golds, ["no", "yes"])
    assert result["mcc"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert result["macro_f1"] == pytest.approx(2 / 3, abs=1e-6)  # F1 of each class is 2/3
    assert result["confusion_matrix"] == {"labels": ["no", "yes"], "rows": [[2, 1], [1, 2]]}


def test_classification_all_one_class_and_unmatched_replies():
    golds = ["yes", "no", "yes", "no"]
    result = M.classification(["yes"] * 4, golds, ["no", "yes"])
    assert result["mcc"] == 0.0 and result["accuracy"] == 0.5  # predicting one class is chance, not NaN
    assert M.match_label(" Yes.\n", ["no", "yes"]) == "yes"
    assert M.match_label("I think yes", ["no", "yes"]) == M.OTHER
    result = M.classification([M.OTHER, "no", "yes", "no"], golds, ["no", "yes"])
    assert result["valid_label_rate"] == 0.75
    assert result["confusion_matrix"]["labels"] == ["no", "yes", M.OTHER]
    assert result["confusion_matrix"]["rows"][1] == [0, 1, 1]  # gold yes: one right, one named nothing
    empty = M.classification([], [], ["no", "yes"])
    assert empty["accuracy"] is None and no_nan(empty) and no_nan(result)


def test_ece_by_hand():
    # Bin (0.6, 0.7]: two examples, confidence 0.65, accuracy 1/2 -> |0.5 - 0.65| = 0.15, share 1/2.
    # Bin (0.9, 1.0]: two examples, confidence 0.95, accuracy 1 -> 0.05, share 1/2.  ECE = 0.1.
    result = M.expected_calibration_error([0.65, 0.65, 0.95, 0.95], [True, False, True, True])
    assert result["ece"] == pytest.approx(0.1, abs=1e-6)
    assert [b["count"] for b in result["bins"]] == [2, 2]
    assert M.expected_calibration_error([1.0, 1.0], [True, True])["ece"] == 0.0
    assert M.expected_calibration_error([], [])["ece"] is None
    # Through classification: the most probable label is scored against the gold one.
    probs = [[0.35, 0.65], [0.35, 0.65], [0.95, 0.05], [0.05, 0.95]]
    result = M.classification(["yes", "yes", "no", "yes"], ["yes", "no", "no", "yes"], ["no", "yes"], probs)
    assert result["ece"] == pytest.approx(0.1, abs=1e-6)


def test_free_text_and_latency():
    rows = [M.score_free_text("The Cat sat.", "cat sat"), M.score_free_text("dog", "dog"), M.score_free_text("x", "")]
    result = M.free_text(rows)
    assert result["normalised_match"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["exact_match"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["length_ratio"] == pytest.approx((3 / 2 + 1) / 2)  # the empty gold has no ratio
    lat = M.latency([1.0, 2.0, 3.0, 4.0], [10, 10, 10, 10], wall_seconds=4.0)
    assert lat["p50_s"] == 2.5 and lat["tokens_per_second"] == 10.0 and lat["examples_per_second"] == 1.0
    assert M.latency([], [], 0.0)["p50_s"] is None


def test_group_gap():
    recall = {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    result = M.group_gap(["a", "a", "b", None], lambda idx: sum(recall[i] for i in idx) / len(idx))
    assert result["per_group"] == {"a": {"examples": 2, "recall": 0.5}, "b": {"examples": 1, "recall": 1.0}}
    assert (result["gap"], result["worst_group"], result["best_group"]) == (0.5, "a", "b")
    assert M.group_gap(["a", "a"], lambda idx: 1.0)["gap"] is None  # one group: no gap to speak of
