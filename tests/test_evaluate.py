"""The evaluate stage end to end on a real local Ray: a tiny random Llama, base vs a trained LoRA
adapter, batched generation in a Ray Data actor pool, metrics, predictions, report and plots."""

import json
import os

import pyarrow.parquet as pq
import pytest
from conftest import TOY_ANSWERS as ANSWERS

from raytune_app import cli, config
from raytune_app.evaluate.run import EvaluateError, evaluate


@pytest.mark.extended
def test_base_and_tuned_side_by_side_with_report(toy_run):
    recipe, _ = toy_run
    summary = evaluate(recipe)
    out = summary["output_dir"]
    assert set(summary["models"]) == {"base", "tuned"}
    n = summary["examples"]
    assert n > 5
    for name, result in summary["models"].items():
        for key in (
            "json_parse_rate",
            "schema_valid_rate",
            "field_precision",
            "field_recall",
            "field_f1",
            "exact_match",
        ):
            assert result[key] is not None and 0.0 <= result[key] <= 1.0, (name, key)
        latency = result["latency"]
        assert 0 < latency["p50_s"] <= latency["p95_s"] <= latency["p99_s"] and latency["tokens_per_second"] > 0
        assert set(result["groups"]["per_group"]) == {"mail", "chat"} and result["groups"]["column"] == "channel"
    predictions = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    assert len(predictions) == 2 * n
    assert {p["model"] for p in predictions} == {"base", "tuned"}
    assert all(p["gold"] in ANSWERS and isinstance(p["prediction"], str) for p in predictions)
    assert all(p["new_tokens"] <= 12 for p in predictions)
    # The per-example scores agree with the aggregate.
    tuned = [p for p in predictions if p["model"] == "tuned"]
    assert sum(p["parsed"] for p in tuned) / n == pytest.approx(summary["models"]["tuned"]["json_parse_rate"], abs=1e-6)
    for name in ("report.md", "metrics.png", "latency.png", "loss_curve.png", "metrics.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    report = open(os.path.join(out, "report.md")).read()
    assert "| field_f1 |" in report and "![loss curve](loss_curve.png)" in report and "Per group (`channel`)" in report
    assert report.count("### Example ") == 3 and report.count("`tuned`:") == 3

    # Unchanged models, data and settings: the output is reused, not recomputed.
    stamp = os.path.getmtime(os.path.join(out, "metrics.json"))
    again = evaluate(recipe)
    assert (
        again["fingerprint"] == summary["fingerprint"] and os.path.getmtime(os.path.join(out, "metrics.json")) == stamp
    )


@pytest.mark.extended
def test_greedy_batched_generation_matches_one_at_a_time(toy_run):
    """Left padding in a batch must not change a greedy reply: batch 4 and batch 1 agree."""
    recipe, _ = toy_run
    batched = evaluate(recipe)  # batch 4: reused when the test above made it (generation is deterministic)
    single = config.validate(recipe.resolved() | {"evaluate": recipe.resolved()["evaluate"] | {"batch_size": 1}})
    one_by_one = evaluate(single, force=True)

    def read(summary):
        table = pq.read_table(os.path.join(summary["output_dir"], "predictions.parquet"))
        return {(r["model"], r["example"]): r["prediction"] for r in table.to_pylist()}

    assert read(batched) == read(one_by_one)


@pytest.mark.extended
def test_data_file_on_the_command_line_prints_metrics_json(toy_run, write_jsonl, tmp_path, capsys):
    recipe, root = toy_run
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(recipe.resolved()))
    extra = write_jsonl(
        "extra.jsonl", [{"q": f"new ticket {i}", "a": ANSWERS[i % 3], "channel": "mail"} for i in range(5)]
    )
    code = cli.main(
        [
            "evaluate",
            "--recipe",
            str(recipe_file),
            "--data",
            str(extra),
            "--adapter",
            os.path.join(recipe.stage_dir("train"), "adapter"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # stdout holds the metrics JSON and nothing else
    assert result["examples"] == 5 and set(result["models"]) == {"base", "adapter"}
    assert os.path.exists(os.path.join(result["output_dir"], "report.md"))
    assert result["output_dir"].startswith(os.path.join(recipe.run_dir, "evaluate-files", "extra-"))

    # A bad row fails before any model loads, naming the file, the line and the field.
    bad = write_jsonl("bad.jsonl", [{"q": "fine", "a": ANSWERS[0]}, {"q": "no answer"}])
    strict = config.validate(recipe.resolved() | {"data": recipe.resolved()["data"] | {"on_error": "fail"}})
    with pytest.raises(Exception, match=r"bad\.jsonl.*line 2.*`a`|bad\.jsonl.*2.*a"):
        evaluate(strict, data_file=str(bad))
    with pytest.raises(EvaluateError, match="no such file"):
        evaluate(recipe, data_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(EvaluateError, match="no such folder"):
        evaluate(recipe, adapter=str(tmp_path / "nowhere"))


@pytest.mark.extended
def test_classification_metrics_with_calibration(toy_run, write_jsonl):
    recipe, _ = toy_run
    rows = [{"q": f"is {i} even?", "a": ["yes", "no"][i % 2]} for i in range(6)]
    data = write_jsonl("yesno.jsonl", rows)
    ev = {
        "task": "classification",
        "labels": ["no", "yes"],
        "max_new_tokens": 3,
        "batch_size": 3,
        "group_column": None,
        "schema_file": None,
    }
    classify = config.validate(recipe.resolved() | {"evaluate": recipe.resolved()["evaluate"] | ev})
    summary = evaluate(classify, data_file=str(data))
    for result in summary["models"].values():
        assert result["ece"] is not None and 0 <= result["ece"] <= 1
        assert sum(sum(row) for row in result["confusion_matrix"]["rows"]) == 6
        assert -1 <= result["mcc"] <= 1 and result["calibration"]
    assert os.path.getsize(os.path.join(summary["output_dir"], "calibration.png")) > 0
    probs = pq.read_table(os.path.join(summary["output_dir"], "predictions.parquet")).column("label_probs").to_pylist()
    assert all(abs(sum(p) - 1) < 1e-5 and len(p) == 2 for p in probs)


def test_recipe_problems_are_reported_before_any_work(tmp_path, tiny_model):
    from conftest import toy_recipe

    resolved = toy_recipe(tmp_path, tiny_model).resolved()
    with pytest.raises(config.RecipeError) as info:
        config.validate(
            resolved | {"evaluate": resolved["evaluate"] | {"group_column": "region", "schema_file": "/no/schema.json"}}
        )
    text = str(info.value)
    assert "evaluate.group_column: `region` is not in data.keep_columns" in text
    assert "evaluate.schema_file: no file at /no/schema.json" in text
    with pytest.raises(config.RecipeError, match="labels apply to task classification only"):
        config.validate(resolved | {"evaluate": resolved["evaluate"] | {"labels": ["a", "b"]}})
