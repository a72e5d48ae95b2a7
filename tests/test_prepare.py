"""The prepare stage end to end on a real local Ray: bad rows, every format, splits, packing, reuse."""

import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raytune_app import config
from raytune_app.cli import main
from raytune_app.data import rows
from raytune_app.data.prepare import RowError, load_split, prepare

pytestmark = pytest.mark.usefixtures("ray_local")


def good_rows(n, start=0):
    return [
        {"q": f"Question number {i}: what is {i} plus {i}?", "a": f"It is {2 * i}.", "grp": "ab"[i % 2]}
        for i in range(start, start + n)
    ]


def make_recipe(tmp_path, tiny_model, sources, **data):
    raw = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "model": {"path": tiny_model},
        "data": {
            "sources": [str(s) for s in sources],
            "columns": {"prompt": "q", "response": "a"},
            "max_seq_length": 96,
            "batch_size": 16,
            **data,
        },
    }
    return config.validate(raw)


def all_hashes(stage_dir):
    out = {}
    for split in ("train", "val", "test"):
        table = load_split(stage_dir, split)
        column = "example_hashes" if "example_hashes" in table.column_names else "content_hash"
        for value in table[column].to_pylist():
            for h in value if isinstance(value, list) else [value]:
                assert h not in out, "an example appears twice"
                out[h] = split
    return out


QA = rows.RowSpec(kind="prompt_response", prompt="q", response="a")


def expected_hash(record, spec=QA):
    return rows.content_hash(rows.to_example(record, spec))


def test_bad_rows_are_rejected_with_file_line_and_reason_and_valid_rows_all_arrive(tmp_path, tiny_model, write_jsonl):
    valid = good_rows(40)
    lines = [
        json.dumps(valid[0]),
        '{"q": "broken", "a": }',
        json.dumps({"a": "no question"}),
        json.dumps({"q": None, "a": "x"}),
        json.dumps({"q": 5, "a": "x"}),
        "",
        json.dumps({"q": valid[0]["q"] + "   ", "a": " " + valid[0]["a"], "grp": "a"}),
        json.dumps({"q": "long one", "a": "word " * 400, "grp": "a"}),
        "[1, 2]",
    ]
    lines += [json.dumps(r) for r in valid[1:]]
    source = write_jsonl("mixed.jsonl", lines)
    recipe = make_recipe(tmp_path, tiny_model, [source], keep_columns=["grp"])
    manifest = prepare(recipe)

    stage = recipe.stage_dir("prepare")
    rejected = [json.loads(line) for line in open(os.path.join(stage, "rejected.jsonl"))]
    assert [(r["line"], r["reason"], r["field"]) for r in rejected] == [
        (2, "malformed_json", None),
        (3, "missing_field", "q"),
        (4, "null_field", "q"),
        (5, "wrong_type", "q"),
        (7, "duplicate", None),
        (8, "too_long", None),
        (9, "not_an_object", None),
    ]
    assert all(r["source_file"] == str(source) for r in rejected)
    assert rejected[0]["raw"] == '{"q": "broken", "a": }'
    assert "line 1" in rejected[4]["message"]  # the duplicate names the row that was kept

    assert set(all_hashes(stage)) == {expected_hash(r) for r in valid}
    assert manifest["rows_in"] == 47 and sum(manifest["rows_out"].values()) == 40
    assert manifest["rejected"] == {
        "duplicate": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "not_an_object": 1,
        "null_field": 1,
        "too_long": 1,
        "wrong_type": 1,
    }
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        assert len(info["content_hash"]) == 32 and info["token_lengths"]["max"] <= 96
    assert manifest["tokenizer"] and manifest["recipe_hash"] and manifest["splits"]["train"]["tokens"] > 0
    test = load_split(stage, "test")
    assert set(test.column_names) >= {
        "messages",
        "input_ids",
        "completion_mask",
        "num_tokens",
        "source_file",
        "source_row",
        "grp",
    }
    assert set(test["grp"].to_pylist()) <= {"a", "b"}
    record = test.slice(0, 1).to_pylist()[0]
    assert record["messages"][-1]["role"] == "assistant" and len(record["input_ids"]) == record["num_tokens"]


@pytest.mark.extended
def test_csv_parquet_and_jsonl_sources_together(tmp_path, tiny_model, write_jsonl):
    data = good_rows(30)
    jsonl = write_jsonl("a.jsonl", data[:10])
    csv_path = tmp_path / "b.csv"
    with csv_path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["q", "a", "grp"])
        writer.writeheader()
        writer.writerows(data[10:20])
        writer.writerow({"q": "multi\nline question here", "a": "", "grp": "a"})  # empty answer cell -> null
    parquet_path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(data[20:] + [{"q": "no answer", "a": None, "grp": "a"}]), parquet_path)
    manifest = prepare(make_recipe(tmp_path, tiny_model, [jsonl, csv_path, parquet_path]))
    assert sum(manifest["rows_out"].values()) == 30
    rejected = [json.loads(line) for line in open(tmp_path / "runs/t/prepare/rejected.jsonl")]
    assert [(os.path.basename(r["source_file"]), r["line"], r["reason"]) for r in rejected] == [
        ("b.csv", 12, "null_field"),
        ("c.parquet", 11, "null_field"),
    ]


def test_fail_mode_names_file_line_field_and_keeps_previous_output(tmp_path, tiny_model, write_jsonl):
    good = write_jsonl("good.jsonl", good_rows(20))
    recipe = make_recipe(tmp_path, tiny_model, [good])
    first = prepare(recipe)
    bad = write_jsonl("bad.jsonl", good_rows(5) + [{"q": "fine", "a": 42}])
    failing = make_recipe(tmp_path, tiny_model, [bad], on_error="fail")
    with pytest.raises(RowError, match=r"bad.jsonl, line 6, field `a`: `a` must be a string \(the response\), got int"):
        prepare(failing)
    kept = json.load(open(tmp_path / "runs/t/prepare/manifest.json"))
    assert kept["fingerprint"] == first["fingerprint"]
    assert not [p for p in os.listdir(tmp_path / "runs/t") if ".incoming" in p], "staging left behind"


def test_unchanged_inputs_are_reused_and_changes_recompute(tmp_path, tiny_model, write_jsonl):
    source = write_jsonl("d.jsonl", good_rows(20))
    recipe = make_recipe(tmp_path, tiny_model, [source])
    first = prepare(recipe)
    assert prepare(recipe)["created"] == first["created"]
    assert (
        prepare(make_recipe(tmp_path, tiny_model, [source], max_seq_length=120))["fingerprint"] != first["fingerprint"]
    )


@pytest.mark.extended
def test_split_is_stable_when_rows_are_added_and_reordered(tmp_path, tiny_model, write_jsonl):
    base = good_rows(60)
    prepare(make_recipe(tmp_path / "one", tiny_model, [write_jsonl("one.jsonl", base)]))
    before = all_hashes(tmp_path / "one/runs/t/prepare")
    grown = list(reversed(base)) + good_rows(30, start=100)
    prepare(make_recipe(tmp_path / "two", tiny_model, [write_jsonl("two.jsonl", grown)]))
    after = all_hashes(tmp_path / "two/runs/t/prepare")
    assert {h: after[h] for h in before} == before
    assert len(after) == 90


@pytest.mark.extended
def test_packing_fills_train_sequences_and_leaves_val_test_whole(tmp_path, tiny_model, write_jsonl):
    source = write_jsonl("p.jsonl", good_rows(80))
    recipe = make_recipe(tmp_path, tiny_model, [source], packing=True, max_seq_length=128, batch_size=64)
    manifest = prepare(recipe)
    train = load_split(recipe.stage_dir("prepare"), "train")
    assert set(train.column_names) == {"input_ids", "completion_mask", "seq_lengths", "num_tokens", "example_hashes"}
    assert train.num_rows < manifest["rows_out"]["train"]  # several examples per sequence
    for row in train.to_pylist():
        assert (
            sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["completion_mask"]) == row["num_tokens"] <= 128
        )
    assert sum(len(h) for h in train["example_hashes"].to_pylist()) == manifest["rows_out"]["train"]
    assert "messages" in load_split(recipe.stage_dir("prepare"), "val").column_names


@pytest.mark.extended
def test_preference_data(tmp_path, tiny_model, write_jsonl):
    pairs = [
        {"prompt": f"Say something nice {i}", "chosen": f"You are great {i}", "rejected": f"Go away {i}"}
        for i in range(20)
    ]
    pairs.append({"prompt": "same", "chosen": "x", "rejected": "x"})
    recipe = config.validate(
        {
            "run": {"name": "pref", "output_dir": str(tmp_path / "runs")},
            "model": {"path": tiny_model},
            "data": {"sources": [str(write_jsonl("pairs.jsonl", pairs))], "kind": "preference"},
            "train": {"method": "dpo"},
        }
    )
    manifest = prepare(recipe)
    assert sum(manifest["rows_out"].values()) == 20 and manifest["rejected"] == {"chosen_equals_rejected": 1}
    row = load_split(recipe.stage_dir("prepare"), "train").slice(0, 1).to_pylist()[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"][0]["content"].startswith("You are great")


def test_cli_prepare_and_run(tmp_path, tiny_model, write_jsonl, capsys):
    bad = write_jsonl("bad.jsonl", good_rows(3) + ['{"q": oops'])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "cli", "output_dir": str(tmp_path / "runs")},
                "model": {"path": tiny_model},
                "data": {"sources": ["bad.jsonl"], "columns": {"prompt": "q", "response": "a"}, "on_error": "fail"},
            }
        )
    )
    assert main(["prepare", "--recipe", str(recipe_path)]) == 4
    assert f"{bad}, line 4: not valid JSON" in capsys.readouterr().err
    assert main(["run", str(recipe_path), "data.on_error=skip", "run.stages=[prepare]"]) == 0
    out = capsys.readouterr().out
    assert "rejected: malformed_json 1" in out and "[run] done: prepare" in out
    saved = yaml.safe_load(open(tmp_path / "runs/cli/recipe.yaml"))
    assert saved["data"]["on_error"] == "skip" and saved["data"]["max_seq_length"] == 1024
