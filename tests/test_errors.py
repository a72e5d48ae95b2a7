"""Errors: a mistake the user can fix is one readable line and its exit code, also when it was raised
inside a Ray worker; anything else is a bug and keeps its traceback, with a request to report it."""

import pytest

from raytune_app import cli, errors
from raytune_app.data.prepare import RowError
from raytune_app.train.run import TrainError


def test_stage_errors_share_the_base_and_keep_their_old_types():
    assert issubclass(TrainError, errors.DataError) and issubclass(TrainError, ValueError)
    assert issubclass(errors.MissingInput, FileNotFoundError)
    assert errors.RecipeError("r.yaml", ["x: bad"]).exit_code == 2
    assert RowError("bad").exit_code == 4 and errors.ClusterError("none").exit_code == 1


def test_the_user_error_behind_rays_wrappers_is_found():
    from ray.exceptions import RayTaskError

    cause = RowError("data.jsonl, line 3, field `a`: missing")
    wrapped = RayTaskError("map_batches", "Traceback ...", cause).as_instanceof_cause()
    assert errors.user_error(wrapped) is cause
    try:
        try:
            raise cause
        except RowError as inner:
            raise RuntimeError("the worker group failed") from inner
    except RuntimeError as outer:
        assert errors.user_error(outer) is cause
    assert errors.user_error(KeyError("x")) is None


def test_a_user_error_is_one_line_and_its_exit_code(tmp_path, capsys):
    bad = tmp_path / "labelled.jsonl"
    bad.write_text('{"text": "hi"}\n')
    assert cli.main(["guard", "eval", "--model", str(tmp_path), "--data", str(bad)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "labelled.jsonl" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(args):
        return {}["no such key"]

    monkeypatch.setattr(cli, "_registry", broken)
    assert cli.main(["registry", "list", "--tracking-uri", "sqlite:///unused.db"]) == errors.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'no such key'" in err
    assert cli.BUG_HINT in err


@pytest.mark.parametrize("code", [errors.EXIT_BAD_RECIPE, errors.EXIT_BAD_DATA, errors.EXIT_NO_CLUSTER])
def test_exit_codes_are_documented_in_the_readme(code):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| {code} |" in readme
