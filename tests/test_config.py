"""The recipe schema: every shipped recipe validates; every kind of mistake is named precisely."""

from pathlib import Path

import pytest
import yaml

from raytune_app import config
from raytune_app.cli import main

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
MINIMAL = {"data": {"sources": ["data.jsonl"]}}


def problems(raw, overrides=None):
    with pytest.raises(config.RecipeError) as caught:
        config.validate(raw, "r.yaml", overrides)
    assert str(caught.value).startswith("r.yaml:")
    return caught.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = config.load(path)
    assert recipe.run.stages


def test_shipped_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


def test_wrong_type_names_field_and_value():
    assert problems(MINIMAL | {"train": {"lora": {"rank": "eight"}}}) == [
        'train.lora.rank: must be a valid integer, got "eight"'
    ]


def test_out_of_range_names_bound():
    (line,) = problems(MINIMAL | {"train": {"lora": {"rank": 0}}})
    assert line == "train.lora.rank: must be greater than 0, got 0"


def test_unknown_keys_get_did_you_mean():
    found = problems(MINIMAL | {"trian": {}, "train": {"lora": {"alpah": 8}}})
    assert "trian: unknown key; did you mean `train`?" in found
    assert "train.lora.alpah: unknown key; did you mean `alpha`?" in found


def test_unknown_key_without_close_match_lists_known_keys():
    (line,) = problems(MINIMAL | {"run": {"zzz": 1}})
    assert line.startswith("run.zzz: unknown key; known keys: name, output_dir")


def test_overrides_are_typed_and_attributed():
    recipe = config.validate(MINIMAL, "r.yaml", ["train.lora.rank=8", "data.split.val=0.2", "run.stages=[prepare]"])
    assert recipe.train.lora.rank == 8 and recipe.data.split.val == 0.2 and recipe.run.stages == ["prepare"]
    assert problems(MINIMAL, ["train.lora.rnak=8"]) == [
        "train.lora.rnak (from the command line): unknown key; did you mean `rank`?"
    ]
    with pytest.raises(
        config.RecipeError, match="(?s)command line: .*override 'train.lora.rank': write it as key.sub=value"
    ):
        config.validate(MINIMAL, "r.yaml", ["train.lora.rank"])


def test_alpha_defaults_to_four_times_rank_and_can_be_overridden():
    assert config.validate(MINIMAL, overrides=["train.lora.rank=8"]).train.lora.effective_alpha == 32
    assert config.validate(MINIMAL, overrides=["train.lora.alpha=16"]).train.lora.effective_alpha == 16


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.finetuning=qlora", "train.deepspeed.stage=3"], "train: QLoRA with DeepSpeed ZeRO-3 is not supported"),
        (["train.precision=fp16", "train.use_gpu=false"], "train: precision fp16 needs a GPU"),
        (
            ["train.deepspeed.stage=2", "train.deepspeed.offload_params=true"],
            "train.deepspeed: offload_params needs ZeRO stage 3",
        ),
        (["data.split.val=0.5", "data.split.test=0.5"], "data.split: val + test must be below 1"),
        (["data.generator.rows=10"], "data: give exactly one of `sources`"),
        (["data.columns.messages=chat"], "data: columns ['messages'] do not belong to kind `prompt_response`"),
        (["data.kind=preference", "data.packing=true"], "data: packing applies to SFT data"),
        (
            ["data.filters.min_prompt_chars=10", "data.filters.max_prompt_chars=5"],
            "data.filters: min_prompt_chars (10) is above",
        ),
        (["train.warmup=1.5"], "train: warmup as a fraction must be below 1"),
        (["run.stages=[prepare, deploy]"], "run.stages.1: must be 'prepare', 'distill'"),
    ],
)
def test_incompatible_choices_fail_with_reason(overrides, expected):
    found = problems(MINIMAL, overrides)
    assert any(line.startswith(expected) for line in found), found


def test_all_problems_reported_at_once():
    found = problems({"data": {"sources": ["a"], "split": {"val": -1}}, "train": {"lora": {"rank": "x"}}, "x": 1})
    assert len(found) == 3


def test_missing_data_section():
    assert problems({}) == ["data: required, but not given"]


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  sources: [a.jsonl\n")
    with pytest.raises(config.RecipeError) as caught:
        config.load(path)
    assert str(path) in str(caught.value) and "line 3" in caught.value.problems[0]


def test_missing_recipe_file(tmp_path):
    with pytest.raises(config.RecipeError, match="recipe file not found"):
        config.load(tmp_path / "nope.yaml")


def test_relative_sources_resolve_against_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": ["d.jsonl", "s3://bucket/x.jsonl"]}}))
    recipe = config.load(path)
    assert recipe.resolve_source("d.jsonl") == str(tmp_path / "sub" / "d.jsonl")
    assert recipe.resolve_source("s3://bucket/x.jsonl") == "s3://bucket/x.jsonl"


def test_every_field_is_documented():
    lines = config.explain()
    assert len(lines) > 60
    assert not [line for line in lines if line.endswith(": None")], "a field lacks a description"


def test_saved_resolved_recipe_round_trips(tmp_path):
    recipe = config.validate(MINIMAL, overrides=["train.lora.rank=4"])
    saved = config.save_resolved(recipe, tmp_path)
    again = config.load(saved)
    assert again.resolved() == recipe.resolved()
    assert again.train.lora.rank == 4 and again.data.max_seq_length == 1024


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert main(["validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", str(good), "train.lora.rank=eight"]) == 2
    err = capsys.readouterr().err
    assert 'train.lora.rank (from the command line): must be a valid integer, got "eight"' in err


def test_cli_tune_without_a_search_space_says_what_to_search(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert main(["tune", "--recipe", str(good)]) == 2  # before any Ray work
    assert "tune.search_space is empty" in capsys.readouterr().err


def test_cli_help_on_each_command(capsys):
    for command in ("validate", "prepare", "distill", "train", "tune", "evaluate", "serve", "run"):
        with pytest.raises(SystemExit) as caught:
            main([command, "--help"])
        assert caught.value.code == 0
        assert "usage: raytune-app " + command in capsys.readouterr().out
