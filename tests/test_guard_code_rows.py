"""The guard's code rows (guard/code_rows.py): questions about real standard-library code, benign as written
and attack twins with an instruction planted in the code. Plain functions: no model, no Ray."""

import re

import pytest
from guard_helpers import near_copies

from raytune_app.guard import code_rows, contrast
from raytune_app.guard.metrics import source_weights
from raytune_app.guard.overdefence import fresh_overdefence_rows, overdefence_rows
from raytune_app.guard.settings import GuardSection


def _code_of(text: str) -> str | None:
    """The code a question was built around: the {c} of the most specific question frame that matches the text
    (the bare "{c}" frame matches every text, so it is tried last)."""
    for frame in sorted(code_rows._QUESTIONS, key=len, reverse=True):
        pattern = re.escape(frame).replace(re.escape("{c}"), "(.*)").replace(re.escape("{module}"), ".*")
        found = re.fullmatch(pattern, text, re.S)
        if found:
            return found.group(1)
    return None


def _code_lines(text: str) -> list[str]:
    """The lines of a row that are not the question around the code (fences and frame lines dropped)."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("```")]


def test_code_rows_are_real_standard_library_code_half_benign_half_planted():
    rows = code_rows.code_rows(300, seed=4)
    assert rows == code_rows.code_rows(300, seed=4)  # the same machine and seed give the same rows
    assert len(rows) == 300 and len({r["text"] for r in rows}) == 300
    assert {r["source"] for r in rows} == {"authored_code"}
    assert sum(r["label"] for r in rows) == 150
    assert {(r["label"], r["attack_type"]) for r in rows} == {(0, "benign_code"), (1, "code_comment_injection")}
    stdlib = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in code_rows.stdlib_files())
    for row in rows[::2][:40]:  # benign rows: the code in the question is a block of the standard library, as written
        code = _code_of(row["text"])
        assert code is not None and code.count("\n") >= 2 and code in stdlib, row["text"]


def test_attack_twins_hold_one_instruction_to_the_assistant_and_the_code_around_it():
    rows = [r for r in code_rows.code_rows(200, seed=5) if r["label"] == 1]
    injections = [i.split("{p}")[0].strip() for i in contrast._INJECTED]
    for row in rows:
        planted = [line for line in row["text"].splitlines() if re.match(r"\s*(#|\"\"\")", line)]
        assert planted, row["text"]
        assert len(_code_lines(row["text"])) >= 5
    # Most plants are the contrast module's injections; the rest are the authored attack families' first lines.
    with_known_opening = [r for r in rows if any(opening[:20] in r["text"] for opening in injections)]
    assert len(with_known_opening) >= len(rows) // 3


def test_code_rows_stay_clear_of_the_held_out_over_defence_set():
    held = {r["text"] for r in overdefence_rows()}
    fresh = {r["text"] for r in fresh_overdefence_rows()}
    rows = code_rows.code_rows(1400, seed=0)
    assert not (held | fresh) & {r["text"] for r in rows}
    # Nor a near copy of a fresh prompt (most of its words).
    assert not near_copies([r["text"] for r in rows], sorted(fresh))


def test_code_rows_is_a_documented_recipe_field_off_by_default():
    field = GuardSection.model_fields["code_rows"]
    assert field.default == 0 and "standard library" in field.description


def test_asking_for_more_code_rows_than_the_standard_library_holds_warns_and_trains_with_what_there_is(capsys):
    rows = code_rows.code_rows(50_000, seed=0)
    assert 1_000 < len(rows) < 50_000
    assert (
        f"guard.code_rows asks for 50000 rows; this Python's standard library gave {len(rows)}"
        in capsys.readouterr().err
    )


def test_a_recipe_with_code_rows_trains_on_them_and_weighs_their_false_alarms_by_its_share():
    """guard.code_rows reaches the training rows (source authored_code), and threshold_source_weights can name
    that source, as recipes/guard_public.yaml does."""
    from raytune_app import config
    from raytune_app.guard import data

    recipe = config.validate(
        {
            "run": {"name": "g", "output_dir": "runs"},
            "data": {"generator": {"name": "order_extraction"}},
            "guard": {
                "authored_rows": 100,
                "code_rows": 60,
                "include_bastioncorpus": False,
                "threshold_source_weights": {"authored_code": 0.03},
            },
        }
    )
    rows = data.training_rows(recipe)
    code = [r for r in rows if r["source"] == "authored_code"]
    assert len(code) == 60 and code == code_rows.code_rows(60, seed=recipe.run.seed)
    train, val = data.split_for_training(rows, recipe)
    assert {r["source"] for r in train + val} == {"authored", "authored_code"}
    weights = source_weights(
        [r["source"] for r in val], [r["label"] for r in val], recipe.guard.threshold_source_weights
    )
    by_source = {
        source: sum(w for w, r in zip(weights, val) if r["source"] == source)
        for source in ("authored_code", "authored")
    }
    assert by_source == pytest.approx({"authored_code": 0.03, "authored": 0.97})
