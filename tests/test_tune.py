"""The tune stage on a real local Ray: Ray Tune trials that are Ray Train runs of a tiny random Llama.

One search (4 trials, a grid over learning rate x LoRA alpha ratio where half the learning rates are
far too small to learn) is interrupted after two trials have ended and resumed; the tests then check
the resume, ASHA's early stops, the best recipe (it validates and reproduces the trial's metric), the
table, the plot and MLflow. Bad search spaces are refused before any trial starts.
"""

import json
import os
import sys

import pytest
import yaml
from conftest import prepare_once, toy_recipe

from raytune_app import config
from raytune_app.cli import main
from raytune_app.registry import store
from raytune_app.tune.cleanup import release_orphaned_placement_groups
from raytune_app.tune.run import INTERRUPT_ENV, TuneError, tune

GOOD_LR, BAD_LR = 5e-3, 1e-6
SPACE = {"train.learning_rate": {"choice": [GOOD_LR, BAD_LR]}, "train.lora.alpha_ratio": {"choice": [1, 4]}}


def tune_recipe(root, model, **tune_section):
    base = toy_recipe(root, model, max_steps=8, checkpoint={"every_steps": 2, "keep_best": 1})
    raw = base.resolved()
    raw["run"]["stages"] = ["prepare", "train", "tune"]
    # One trial at a time: the grid runs (good, 1), (bad, 1), (good, 4), (bad, 4) in that order, so each bad
    # trial reaches its first rung after a good one has recorded there and ASHA's cut is deterministic (with
    # two at once, a bad trial reporting first at a rung has nothing to be compared with).
    raw["tune"] = {
        "search_space": SPACE,
        "algorithm": "grid",
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "early_stopping": {"grace_period": 2, "reduction_factor": 2},
    } | tune_section
    return config.validate(raw)


@pytest.fixture(scope="module")
def searched(ray_local, tiny_model, tmp_path_factory):
    """(recipe, first session's summary, final summary): a search interrupted after 2 trials, then resumed."""
    root = tmp_path_factory.mktemp("tune")
    recipe = tune_recipe(root, tiny_model)
    prepare_once(recipe)
    os.environ[INTERRUPT_ENV] = "2"
    try:
        first = tune(recipe)
    finally:
        del os.environ[INTERRUPT_ENV]
    first["summary_written"] = os.path.exists(os.path.join(recipe.stage_dir("tune"), "summary.json"))
    final = tune(recipe)  # the same recipe and data: the interrupted search continues
    return recipe, first, final


def attempts(recipe, trial_id):
    with open(os.path.join(recipe.stage_dir("tune"), "trials", trial_id, "attempts.jsonl")) as lines:
        return len(lines.readlines())


@pytest.mark.extended
def test_interrupted_search_resumes_without_rerunning_finished_trials(searched):
    recipe, first, final = searched
    # Two trials had ended; the others were running, or not started yet, when the search stopped.
    assert first["interrupted"] and len(first["ended"]) == 2
    assert not first["summary_written"] and final["trials"] == 4
    rows = json.load(open(os.path.join(recipe.stage_dir("tune"), "trials.json")))
    assert sorted(r["trial_id"] for r in rows) == sorted({r["trial_id"] for r in rows}) and len(rows) == 4
    for trial_id in first["ended"]:
        assert attempts(recipe, trial_id) == 1, trial_id  # ended before the interruption: never started again
    restarted = [t for t in first["unfinished"] if os.path.exists(os.path.join(recipe.stage_dir("tune"), "trials", t))]
    assert all(attempts(recipe, t) == 2 for t in restarted)
    # A finished search is not repeated.
    assert tune(recipe) == final


@pytest.mark.extended
def test_asha_stops_bad_trials_and_the_best_recipe_reproduces_the_best_trial(searched, capfd):
    from raytune_app.train.run import train

    recipe, _, summary = searched
    rows = json.load(open(os.path.join(recipe.stage_dir("tune"), "trials.json")))
    stopped = [r for r in rows if r["stopped_early"]]
    assert stopped and all(r["steps"] < 8 and r["config"]["train.learning_rate"] == BAD_LR for r in stopped)
    assert summary["stopped_early"] == len(stopped) and summary["steps"]["total"] < summary["steps"]["budget"]
    best = summary["best"]
    assert best["status"] == "completed" and best["steps"] == 8 and best["config"]["train.learning_rate"] == GOOD_LR
    assert best["final_metric"] == min(r["final_metric"] for r in rows if r["status"] == "completed")
    tune_dir = recipe.stage_dir("tune")
    for name in ("trials.md", "tune_plot.png", "best_recipe.yaml"):
        assert os.path.getsize(os.path.join(tune_dir, name)) > 0, name
    assert "stopped early" in open(os.path.join(tune_dir, "trials.md")).read()

    # Every trial is an MLflow run under the search's run; the best adapter is a registered version.
    client = store.client(store.tracking_uri(recipe))
    search_run = client.get_run(summary["mlflow"]["search_run_id"])
    for row in rows:
        run = client.get_run(summary["mlflow"]["trial_run_ids"][row["trial_id"]])
        assert run.data.tags["mlflow.parentRunId"] == search_run.info.run_id
        assert run.data.tags["stopped_early"] == str(row["stopped_early"]).lower()
    version = store.show(store.tracking_uri(recipe), summary["registered"]["name"], "@challenger")
    best_manifest = json.load(open(os.path.join(best["dir"], "manifest.json")))
    assert version["tags"]["train_fingerprint"] == best_manifest["fingerprint"]

    # The best recipe validates as written and trains the same run: the same metric.
    again = config.load(summary["best_recipe"])
    assert "tune" not in again.run.stages and again.train.learning_rate == GOOD_LR
    ratio = best["config"]["train.lora.alpha_ratio"]
    assert again.train.lora.alpha == ratio * again.train.lora.rank
    prepare_once(again)
    manifest = train(again)
    assert manifest["fingerprint"] == best_manifest["fingerprint"]
    assert manifest["final_eval_loss"] == pytest.approx(best["final_metric"], rel=1e-3)


def problems(raw):
    with pytest.raises(config.RecipeError) as caught:
        config.validate(raw, "r.yaml")
    return caught.value.problems


def test_invalid_search_spaces_are_refused_before_any_trial(tmp_path, tiny_model):
    raw = tune_recipe(tmp_path, tiny_model).resolved()

    def with_space(space, **extra):
        return raw | {"tune": raw["tune"] | {"search_space": space, "algorithm": "random"} | extra}

    found = problems(
        with_space(
            {
                "train.lora.rnak": {"choice": [4, 8]},
                "train.learning_rate": {"loguniform": [0, 1e-3]},
                "train.scheduler": {"choice": []},
                "train.warmup": {"uniform": [0.2, 0.1]},
                "train.lora.rank": {"choice": [4, "eight"]},
                "train.workers": {"choice": [1, 2]},
                "data.max_seq_length": {"choice": [64]},
                "train.lora": {"choice": [1]},
            }
        )
    )
    assert any(
        line.startswith("tune.search_space.train.learning_rate") and "loguniform needs low > 0" in line
        for line in found
    )
    assert any(line.startswith("tune.search_space.train.scheduler") and "choice is empty" in line for line in found)
    assert any(line.startswith("tune.search_space.train.warmup") and "low < high" in line for line in found)
    # Paths and values are checked against the train section only when every spec is well formed.
    found = problems(
        with_space(
            {
                "train.lora.rnak": {"choice": [4, 8]},
                "train.lora.rank": {"choice": [4, "eight"]},
                "train.workers": {"choice": [1, 2]},
                "data.max_seq_length": {"choice": [64]},
                "train.lora": {"choice": [1]},
                "train.scheduler": {"choice": ["cosine", "cosin"]},
            }
        )
    )
    assert "tune.search_space.train.lora.rnak: no such field in the recipe" in "\n".join(found)
    assert any("train.lora.rank: value 'eight' is not valid" in line and "integer" in line for line in found)
    assert any("train.scheduler: value 'cosin' is not valid" in line for line in found)
    assert any("train.workers: cannot be searched" in line for line in found)
    assert any("data.max_seq_length: only fields of `train`" in line for line in found)
    assert any("train.lora: is a section" in line for line in found)
    assert any(
        "not both" in line
        for line in problems(
            with_space({"train.lora.alpha": {"choice": [8]}, "train.lora.alpha_ratio": {"choice": [2]}})
        )
    )
    assert any(
        "algorithm grid enumerates" in line
        for line in problems(with_space({"train.learning_rate": {"loguniform": [1e-5, 1e-3]}}, algorithm="grid"))
    )
    no_budget = raw | {"train": raw["train"] | {"max_steps": None}}
    assert any("set train.max_steps" in line for line in problems(no_budget))

    # The CLI refuses before any Ray work (exit 2), naming the field.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_space({"train.lora.rank": {"choice": []}})))
    assert main(["tune", "--recipe", str(bad)]) == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump(raw | {"tune": {}}))
    assert main(["run", str(empty)]) == 2  # run.stages has tune: refused before prepare and train run


def test_a_grid_runs_once_unless_num_samples_says_otherwise():
    from raytune_app.tune.settings import TuneSection

    space = {"train.learning_rate": {"choice": [1e-3, 2e-3]}}
    assert TuneSection.model_validate({"algorithm": "grid", "search_space": space}).num_samples == 1
    assert TuneSection.model_validate({"algorithm": "grid", "search_space": space, "num_samples": 2}).num_samples == 2
    assert TuneSection.model_validate({"search_space": space}).num_samples == 8  # random: 8 samples


def test_a_trial_that_can_never_fit_fails_before_anything_starts(ray_local, tmp_path, tiny_model):
    raw = tune_recipe(tmp_path, tiny_model).resolved()
    too_big = config.validate(raw | {"train": raw["train"] | {"workers": 3}})
    prepare_once(too_big)
    with pytest.raises(
        TuneError,
        match=r"one trial can never start: train.workers=3 x tune.cpus_per_worker=1 needs 3 CPUs, the cluster has 2",
    ):
        tune(too_big)
    assert not os.path.exists(too_big.stage_dir("tune"))


@pytest.mark.extended
def test_the_cli_reports_a_finished_search_and_run_includes_tune(searched, tmp_path, capsys):
    recipe, _, summary = searched
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(recipe.resolved()))
    assert main(["tune", "--recipe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and f"best recipe: {summary['best_recipe']}" in out
    assert main(["run", str(path), "run.stages=[tune]"]) == 0
    assert "registered as models:/" in capsys.readouterr().out
    assert main(["tune", "--recipe", str(path), "--resume"]) == 4  # nothing left to resume
    assert "nothing to resume" in capsys.readouterr().err


def test_optuna_samples_the_recipe_space_through_ray_tune(tmp_path, tiny_model):
    from ray.tune.search.optuna import OptunaSearch

    from raytune_app.tune.run import param_space
    from raytune_app.tune.settings import apply_sample, typed_space

    raw = tune_recipe(tmp_path, tiny_model).resolved()
    raw["tune"] |= {
        "algorithm": "optuna",
        "search_space": {
            "train.learning_rate": {"loguniform": ["1e-5", "1e-3"]},
            "train.lora.rank": {"choice": [4, 8]},
            "train.warmup": {"randint": [0, 3]},
            "train.lora.alpha_ratio": {"choice": [1, 4]},
        },
    }
    recipe = config.validate(raw)
    searcher = OptunaSearch(
        space=param_space(typed_space(recipe.tune, recipe.train), "optuna"), metric="eval_loss", mode="min", seed=0
    )
    for index in range(8):
        sample = searcher.suggest(f"t{index}")
        assert 1e-5 <= sample["train.learning_rate"] <= 1e-3 and sample["train.lora.rank"] in (4, 8)
        assert sample["train.warmup"] in (0, 1, 2, 3) and sample["train.lora.alpha_ratio"] in (1, 4)
        trial = config.validate(raw | {"train": apply_sample(raw["train"], sample)})
        assert trial.train.lora.alpha == sample["train.lora.alpha_ratio"] * sample["train.lora.rank"]
        searcher.on_trial_complete(f"t{index}", {"eval_loss": 1.0 + index})


@pytest.mark.extended
def test_stopped_trials_leave_no_placement_groups_or_cleaner_actors(searched):
    """ASHA and the interruption ended trials abruptly: their Train controllers died without giving back
    the workers' placement group, and Train's detached cleaner actors stay when they cannot reach the
    state API (no dashboard here). The tune driver gives both back."""
    import time

    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    def orphaned_groups():
        tables = [
            gcs_pb2.PlacementGroupTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_placement_group_table()
        ]
        return [
            t
            for t in tables
            if t.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and t.creator_actor_dead
            and set(t.creator_actor_id) != {0xFF}
        ]

    def cleaners():
        return [
            a
            for a in state.actor_table(None).values()
            if a["ActorClassName"] == "PlacementGroupCleaner" and a["State"] == "ALIVE"
        ]

    deadline = time.time() + 20  # the tune driver's last sweep may have come just before a controller died
    while (orphaned_groups() or cleaners()) and time.time() < deadline:
        time.sleep(1)
        release_orphaned_placement_groups()
    assert orphaned_groups() == [] and cleaners() == []


def test_a_search_on_an_image_without_mlflow_keeps_its_results(tmp_path, monkeypatch, capfd):
    """Seen on a bare GPU image (torch, no MLflow): the search ran, then its summary died on the MLflow import.
    Tracking is reported as skipped, like an unreachable store, and the results stay on disk."""
    from raytune_app.tune import tracking

    recipe = tune_recipe(tmp_path, "bundled:smollm2-135m-instruct")
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)  # the import fails as if MLflow were not installed
    best = {"trial_id": "t0", "final_metric": 1.0, "status": "completed", "dir": str(tmp_path)}
    added = tracking.log_search(recipe, [best], best, {"fingerprint": "f"}, str(tmp_path))
    assert added == {"mlflow": None}
    assert "could not log the search to MLflow (ModuleNotFoundError" in capfd.readouterr().err
