"""The run-state rule the train and tune stages share (raytune_app/runstate.py), on real folders.

Restart, reuse, continue, move aside and the refusals of --resume are decided from two small JSON
records; these tests write the records a stage writes and check each branch without Ray. The stages'
own tests (test_train.py, test_tune.py) check the same rule end to end once each.
"""

import json
import os

import pytest

from raytune_app import runstate
from raytune_app.train.run import RUN_RECORDS, TrainError
from raytune_app.tune.run import SEARCH_RECORDS, TuneError


def started(folder, fingerprint, records=RUN_RECORDS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / records.started).write_text(json.dumps({"fingerprint": fingerprint}))


def finished(folder, fingerprint, records=RUN_RECORDS):
    started(folder, fingerprint, records)
    (folder / records.finished).write_text(json.dumps({"fingerprint": fingerprint, "global_step": 8}))


def decide(folder, current="new", records=RUN_RECORDS, error=TrainError, **flags):
    said = []
    state = runstate.decide(str(folder), current, records, error=error, log=said.append, **flags)
    return state, said


def asides(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if ".previous-" in p.name)


def test_a_new_run_writes_its_start_record(tmp_path):
    out = tmp_path / "train"
    state, said = decide(out)
    assert state == runstate.RunState(finished=None, resuming=False, how="recomputed", why="no earlier run")
    assert said == []
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "new"


def test_nothing_to_resume_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "train"
    with pytest.raises(TrainError, match=r"nothing to resume in .*train; drop --resume to start training"):
        decide(out, resume=True)
    assert not out.exists()


def test_an_interrupted_run_with_the_same_fingerprint_continues(tmp_path):
    out = tmp_path / "train"
    started(out, "new")
    for resume in (False, True):
        state, said = decide(out, resume=resume)
        assert state.resuming and state.finished is None and state.how == "resumed" and said == []


def test_a_finished_run_is_reused_and_train_reuses_it_under_resume_too(tmp_path):
    out = tmp_path / "train"
    finished(out, "new")
    for resume in (False, True):  # a chain resumed with --resume passes its finished steps
        state, _ = decide(out, resume=resume)
        assert state.finished["global_step"] == 8 and not state.resuming and state.how == "reused"


def test_tune_refuses_resume_on_a_finished_search(tmp_path):
    out = tmp_path / "tune"
    finished(out, "new", SEARCH_RECORDS)
    state, _ = decide(out, records=SEARCH_RECORDS, error=TuneError)
    assert state.finished is not None
    with pytest.raises(TuneError, match="nothing to resume: the search in .* is finished"):
        decide(out, records=SEARCH_RECORDS, error=TuneError, resume=True)


def test_a_changed_recipe_moves_the_earlier_run_aside_or_refuses_resume(tmp_path):
    out = tmp_path / "train"
    started(out, "old")
    with pytest.raises(
        TrainError, match=r"cannot resume: the recipe or the prepared data changed .* \(fingerprint old, now new\)"
    ):
        decide(out, resume=True)
    assert asides(tmp_path) == []  # refusing touches nothing
    state, said = decide(out)
    assert (
        not state.resuming
        and state.why == "recipe or data changed"
        and len(asides(tmp_path)) == 1
        and asides(tmp_path)[0].startswith("train.previous-old-")
    )
    assert said == [f"recipe or data changed: the earlier run was moved to {tmp_path / asides(tmp_path)[0]}"]
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "new"


def test_restart_moves_even_a_finished_run_aside(tmp_path):
    out = tmp_path / "tune"
    finished(out, "new", SEARCH_RECORDS)
    state, said = decide(out, records=SEARCH_RECORDS, error=TuneError, restart=True)
    assert state == runstate.RunState(finished=None, resuming=False, how="recomputed", why="--restart")
    assert said[0].startswith("--restart: the earlier search was moved to ")
    moved = tmp_path / asides(tmp_path)[0]
    assert os.path.exists(moved / "summary.json")  # never overwritten
    assert sorted(os.listdir(out)) == ["search.json"]


def test_a_finished_run_with_damaged_output_is_continued_not_reused(tmp_path):
    out = tmp_path / "train"
    finished(out, "new")
    state, said = decide(out, damaged=lambda record: "adapter_model.safetensors is cut short")
    assert state.resuming and state.how == "resumed"
    assert said == [
        "adapter_model.safetensors is cut short: continuing the run from its latest checkpoint to make its output again"
    ]
    assert not (out / "manifest.json").exists()
    state, _ = decide(out, damaged=lambda record: None)  # the rerun is then an ordinary interrupted run
    assert state.resuming


def test_a_lost_start_record_is_read_from_the_finished_one(tmp_path):
    out = tmp_path / "train"
    finished(out, "old")
    (out / "run.json").unlink()
    state, said = decide(out)
    assert not state.resuming and said[0].startswith("recipe or data changed: the earlier run was moved to")


def test_the_train_manifest_is_typed_and_reads_like_its_json(tmp_path):
    import pydantic

    from raytune_app.train.manifest import TrainManifest

    fields = {
        "fingerprint": "abc",
        "method": "sft",
        "finetuning": "lora",
        "base_model": "bundled:smollm2-135m-instruct",
        "data_fingerprint": "d1",
        "recipe_hash": "r1",
        "global_step": 8,
        "final_eval_loss": 0.5,
        "trainable_parameters": 1024,
        "weights": str(tmp_path / "adapter"),
        "workers": 1,
        "use_gpu": False,
    }
    manifest = TrainManifest(**fields)
    assert manifest["weights"] == manifest.weights and manifest.get("parent_fingerprint") is None
    with pytest.raises(KeyError):
        manifest["nope"]
    manifest.write(str(tmp_path / "manifest.json"))
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["global_step"] == 8 and "chain" not in on_disk
    assert TrainManifest.read(str(tmp_path / "manifest.json")) == manifest
    assert TrainManifest.read(str(tmp_path / "missing.json")) is None
    with pytest.raises(pydantic.ValidationError, match="global_step"):
        TrainManifest(**(fields | {"global_step": "eight"}))
