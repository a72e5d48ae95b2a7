"""Rationales already in the data: the e-SNLI / GSM8K adapters (raytune_app/data/public.py), the `columns`
teacher (raytune_app/distill/columns.py) and its recipe checks, fast and without Ray; then, in the extended
lane, the distill stage with both missing-rationale policies and a tiny run of each shipped recipe on a few
rows of ../shared/data (skipped where that folder is absent, as on a user's machine)."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import prepare_once

from raytune_app import config
from raytune_app.data import public
from raytune_app.distill import columns, parse

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
MARKERS = ["So the answer is", "The answer is"]


def _esnli(folder: Path, rows: list[tuple[str, ...]], split: str = "dev") -> Path:
    """A small e-SNLI folder: one line-aligned file per field (premise, hypothesis, label, explanation)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(("s1", "s2", "labels", "preproc1_expl_1")):
        (folder / f"{name}.{split}").write_text("".join(row[index] + "\n" for row in rows))
    return folder


def test_esnli_adapter_zips_the_line_aligned_files(tmp_path):
    folder = _esnli(
        tmp_path / "esnli",
        [
            ("A dog runs .", "An animal moves .", "entailment", "a dog is an animal ."),
            ("A man sleeps .", "A man sings .", "contradiction", "   "),  # no explanation on this line
        ],
    )
    first, second = (json.loads(r) for r in public.esnli_rows(str(folder), "dev"))
    assert first == {
        "prompt": "Premise: A dog runs .\nHypothesis: An animal moves .",
        "response": "entailment",
        "rationale": "a dog is an animal .",
    }
    assert second["response"] == "contradiction" and second["rationale"] is None

    (folder / "labels.dev").write_text("entailment\n")  # one line short: not aligned
    with pytest.raises(public.AdapterError, match=r"not line-aligned \(lines: s1.dev 2, s2.dev 2, labels.dev 1"):
        public.esnli_rows(str(folder), "dev")
    with pytest.raises(public.AdapterError, match=r"no s1.train, .*set the source's `split`.*suffixes found: dev"):
        public.esnli_rows(str(folder), "train")


def test_gsm8k_adapter_splits_the_answer_at_the_marker():
    row = json.loads(public.gsm8k_row(json.dumps({"question": "Q?", "answer": "48/2 = <<48/2=24>>24.\n#### 1,024"})))
    assert row == {"prompt": "Q?", "response": "1024", "rationale": "48/2 = 24."}
    assert json.loads(public.gsm8k_row(json.dumps({"question": "Q?", "answer": "no marker"})))["response"] is None
    assert public.gsm8k_row("{not json") == "{not json"  # passed through: prepare reports it with its line


def _prepared(rows):
    """A prepared train split as the distill stage reads it: messages, content hash, kept columns."""
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a, _, _ in rows]
    return pa.table(
        {
            "messages": chats,
            "content_hash": [f"{i:032x}" for i in range(len(rows))],
            "rationale": [r for _, _, r, _ in rows],
            "annotator": [lab for _, _, _, lab in rows],
        }
    )


def _teacher(**settings):
    return config.validate(
        {"data": {"sources": ["d.jsonl"]}, "distill": {"teacher": {"backend": "columns", **settings}}}
    ).distill.teacher


def test_columns_teacher_reads_rationale_and_label_and_handles_rows_without_one():
    from raytune_app.distill.run import _inputs

    table = _prepared(
        [("2 + 2?", "4", "two and two make 4", "4"), ("3 + 3?", "6", None, "7"), ("1 + 0?", "1", "", "1")]
    )
    rows = columns.attach(_inputs(table), table, _teacher(rationale_column="rationale"))
    assert [(r["rationale_text"], r["label_text"]) for r in rows] == [
        ("two and two make 4", "4"),
        (None, "6"),
        (None, "1"),
    ]
    # A teacher text like a model's, so the same parse and gold filter apply to it.
    text, error = columns.teacher_text(rows[0]["rationale_text"], rows[0]["label_text"], MARKERS[0])
    assert error is None and parse.parse(text, MARKERS) == ("two and two make 4", "4", None)
    assert parse.decide("4", [parse.parse(text, MARKERS)], "gold", 0.5)[0] == {
        "rationale": "two and two make 4",
        "label": "4",
    }
    out = columns.run_columns(
        pa.Table.from_pylist([{"rationale_text": r["rationale_text"], "label_text": r["label_text"]} for r in rows]),
        MARKERS[0],
    )
    assert out.column("teacher_text").to_pylist()[1:] == [None, None]
    assert out.column("teacher_error").to_pylist()[1].startswith("no_rationale")

    # label_only keeps every row (label task complete); drop leaves the two without a rationale out.
    assert columns.split_missing(rows, "label_only") == (rows, [])
    kept, dropped = columns.split_missing(rows, "drop")
    assert [r["input"] for r in kept] == ["2 + 2?"] and [r["input"] for r in dropped] == ["3 + 3?", "1 + 0?"]

    # An annotator's label column instead of the gold one: the gold filter then checks it.
    rows = columns.attach(_inputs(table), table, _teacher(rationale_column="rationale", label_column="annotator"))
    assert [r["label_text"] for r in rows] == ["4", "7", "1"]


def test_columns_teacher_names_a_missing_column():
    from raytune_app.distill.run import _inputs

    table = _prepared([("2 + 2?", "4", "two and two make 4", "4")])
    with pytest.raises(
        columns.ColumnsError, match=r"distill.teacher.rationale_column: the prepared rows have no column `expl`"
    ):
        columns.attach(_inputs(table), table, _teacher(rationale_column="expl"))
    with pytest.raises(
        columns.ColumnsError,
        match=r"distill.teacher.label_column: .* no column `gold_label` \(they have: annotator, rationale\)",
    ):
        columns.attach(_inputs(table), table, _teacher(rationale_column="rationale", label_column="gold_label"))


def test_columns_teacher_recipe_checks_name_the_option():
    base = {"data": {"sources": ["d.jsonl"], "keep_columns": ["rationale"]}, "run": {"stages": ["prepare", "distill"]}}
    cases = (
        ({"backend": "columns"}, r"distill.teacher.rationale_column: required for backend columns"),
        (
            {"backend": "columns", "rationale_column": "expl"},
            r"distill.teacher.rationale_column: `expl` is not in data.keep_columns",
        ),
        (
            {"backend": "columns", "rationale_column": "rationale", "label_column": "lab"},
            r"distill.teacher.label_column: `lab` is not in",
        ),
        (
            {"backend": "columns", "rationale_column": "rationale", "missing_rationale": "skip"},
            r"distill.teacher.missing_rationale: .*'drop' or 'label_only'",
        ),
    )
    for teacher, message in cases:
        with pytest.raises(config.RecipeError, match=message):
            config.validate(base | {"distill": {"teacher": teacher}})
    with pytest.raises(config.RecipeError, match=r"distill.samples: backend columns has one rationale per row"):
        config.validate(
            base
            | {
                "distill": {
                    "teacher": {"backend": "columns", "rationale_column": "rationale"},
                    "samples": 2,
                    "filter": "none",
                }
            }
        )
    with pytest.raises(config.RecipeError, match=r"adapter esnli reads files: give `path`"):
        config.validate({"data": {"sources": [{"hf": "x/y", "adapter": "esnli"}]}})


@pytest.mark.parametrize("name", ["dss_esnli.yaml", "dss_gsm8k.yaml"])
def test_public_recipes_use_the_columns_teacher_and_say_where_the_data_is_missing(tmp_path, name):
    from raytune_app.data.inputs import SourceError, resolve

    recipe = config.load(REPO / "recipes" / name)
    assert recipe.distill.teacher.backend == "columns" and "rationale" in recipe.data.keep_columns
    assert recipe.resolve_source(recipe.data.source_sections[0].path).startswith(str(SHARED))
    source = recipe.data.source_sections[0].model_dump(exclude_defaults=True) | {"path": str(tmp_path / "absent")}
    moved = config.load(REPO / "recipes" / name, [f"run.output_dir={tmp_path}", f"data.sources=[{json.dumps(source)}]"])
    with pytest.raises(SourceError, match=r"data.sources\[0\]: adapter \w+: .*absent not found.*\.\./shared/data"):
        resolve(moved)


# ------------------------------------------------------------------------------------- extended lane


def _distill_recipe(tmp_path, model, folder, policy):
    return config.validate(
        {
            "run": {"name": f"cols-{policy}", "output_dir": str(tmp_path / "runs"), "stages": ["prepare", "distill"]},
            "model": {"path": model},
            "data": {
                "sources": [{"path": str(folder), "adapter": "esnli", "split": "dev"}],
                "keep_columns": ["rationale"],
                "max_seq_length": 128,
                "split": {"val": 0.1, "test": 0.1},
            },
            "distill": {
                "teacher": {"backend": "columns", "rationale_column": "rationale", "missing_rationale": policy}
            },
        }
    )


@pytest.mark.usefixtures("ray_local")
@pytest.mark.extended
def test_distill_stage_with_columns_teacher_drops_or_keeps_rows_without_rationale(tmp_path, tiny_model):
    from raytune_app.distill.run import distill

    labels = ("entailment", "neutral", "contradiction")
    rows = [
        (f"Person {i} walks .", f"Someone {i} moves .", labels[i % 3], "" if i % 5 == 0 else f"walking {i} is moving .")
        for i in range(40)
    ]
    folder = _esnli(tmp_path / "esnli", rows)
    label_only = _distill_recipe(tmp_path, tiny_model, folder, "label_only")
    n = prepare_once(label_only)["rows_out"]["train"]
    kept = distill(label_only)
    lacking = kept["rejected"]["no_rationale"]
    assert kept["rejected"] == {"no_rationale": lacking} and lacking > 0
    assert kept["inputs"] == n and kept["tasks"] == {"label": n, "rationale": n - lacking}
    assert kept["teacher"]["backend"] == "columns"
    assert distill(label_only, force=True)["cache_hits"] == n - lacking  # rows with a rationale are cached

    drop = _distill_recipe(tmp_path, tiny_model, folder, "drop")
    prepare_once(drop)
    dropped = distill(drop)
    assert dropped["rejected"] == {"no_rationale": lacking} and dropped["inputs"] == n - lacking
    assert dropped["tasks"] == {"label": n - lacking, "rationale": n - lacking}
    rejected = (tmp_path / "runs" / "cols-drop" / "distill").glob("**/rejected.jsonl")
    reasons = [json.loads(line)["reason"] for path in rejected for line in path.read_text().splitlines()]
    assert reasons == ["no_rationale"] * lacking


def _few_rows(tmp_path, name, lines):
    """The first `lines` rows of the public data set a recipe reads, as a source of the same adapter."""
    if name == "dss_esnli.yaml":
        folder = tmp_path / "esnli"
        folder.mkdir()
        for path in (SHARED / "esnli").glob("*.dev"):
            (folder / path.name).write_text("".join(path.read_text().splitlines(keepends=True)[:lines]))
        return {"path": str(folder), "adapter": "esnli", "split": "dev"}
    target = tmp_path / "train.jsonl"
    target.write_text("".join((SHARED / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return {"path": str(target), "adapter": "gsm8k"}


@pytest.mark.usefixtures("ray_local")
@pytest.mark.extended
@pytest.mark.parametrize("name", ["dss_esnli.yaml", "dss_gsm8k.yaml"])
def test_public_recipe_end_to_end_on_a_few_rows(tmp_path, tiny_model, name):
    """The shipped recipe, with the tiny model, 80 rows of its data set and 2 steps: every stage runs."""
    folder = "esnli" if "esnli" in name else "gsm8k"
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{SHARED / folder} is absent (public data, outside the project)")
    from raytune_app.distill.run import distill
    from raytune_app.evaluate.run import evaluate
    from raytune_app.train.run import train

    overrides = [
        f"run.output_dir={tmp_path / 'runs'}",
        f"model.path={tiny_model}",
        f"data.sources=[{json.dumps(_few_rows(tmp_path, name, 80))}]",
        "data.max_seq_length=512",  # the tiny model's 512-token vocabulary spells GSM8K out in more tokens
        "distill.subsample=1.0",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.workers=1",
        "train.precision=fp32",
        "train.lora.rank=4",
        "train.checkpoint.every_steps=2",
        "evaluate.backend=transformers",
        "evaluate.include_base=false",
        "evaluate.limit=4",
    ]
    recipe = config.load(REPO / "recipes" / name, overrides)
    n = prepare_once(recipe)["rows_out"]["train"]
    distilled = distill(recipe)
    assert distilled["inputs"] == n and distilled["kept_rationales"] == n  # every row has a rationale
    assert distilled["rejected"] == {} and distilled["tasks"]["rationale"] > 0
    assert train(recipe)["global_step"] == 2
    assert evaluate(recipe)["models"]["tuned"]["normalised_match"] is not None
