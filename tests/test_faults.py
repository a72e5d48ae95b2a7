"""Damaged artefacts and a full disk, stage by stage, on a real local Ray with a tiny random Llama.

- Cut-short files (what a crash or a full disk leaves behind on storage that does not write whole
  files): a prepared-data manifest is recomputed; a train manifest or adapter file is named by every
  reader (evaluate, register, the serving engine) and never loaded, while the train stage makes the
  weights again from the run's final checkpoint; a damaged checkpoint file stops a resume by name;
  Ray Train's damaged checkpoint record makes the stage start the run again.
- A full device: the run directory on a real size-limited tmpfs (mounted here; root only, skipped
  elsewhere); prepare fails with an error naming the folder and the space it needed, the previous
  output stays whole, and the run succeeds once there is space.
"""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import prepare_once, toy_recipe

from raytune_app import config, errors, integrity, storage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def _cut(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as out:
        out.write(data[: int(len(data) * keep)])


def _copy_of(toy_run, tmp_path):
    """A copy of the session's trained toy run in its own run directory (damaged here, not there)."""
    recipe, root = toy_run
    copy = config.validate(recipe.resolved() | {"run": recipe.resolved()["run"] | {"output_dir": str(tmp_path)}})
    shutil.copytree(recipe.run_dir, copy.run_dir)
    manifest_path = os.path.join(copy.stage_dir("train"), "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["weights"] = os.path.join(copy.stage_dir("train"), "adapter")  # the manifest names absolute paths
    json.dump(manifest, open(manifest_path, "w"))
    return copy


def _weights(recipe) -> dict:
    from safetensors.torch import load_file

    # Copies: load_file maps the file, and these tests cut files short in place.
    path = os.path.join(recipe.stage_dir("train"), "adapter", "adapter_model.safetensors")
    return {name: tensor.clone() for name, tensor in load_file(path).items()}


@pytest.mark.extended
def test_a_cut_short_adapter_is_named_by_every_reader_and_made_again_from_the_checkpoint(toy_run, tmp_path, capfd):
    from raytune_app.evaluate.run import evaluate
    from raytune_app.registry import store
    from raytune_app.serve.engine import Engine
    from raytune_app.train.run import train

    recipe = _copy_of(toy_run, tmp_path)
    whole = _weights(recipe)
    damaged = os.path.join(recipe.stage_dir("train"), "adapter", "adapter_model.safetensors")
    _cut(damaged)

    with pytest.raises(storage.Damaged, match="adapter_model.safetensors"):
        evaluate(recipe)
    # The run's MLflow copy of the weights was made when training finished: registering uses that whole copy.
    [version] = store.register_stage(recipe)
    assert integrity.weights_problem(store.download(recipe, f"models:/{version['name']}/{version['version']}")) is None
    # A store that has not seen the run must copy the weights from the run directory: refused, by name.
    elsewhere = config.validate(recipe.resolved() | {"registry": {"tracking_uri": f"sqlite:///{tmp_path}/other.db"}})
    with pytest.raises(storage.Damaged, match="adapter_model.safetensors"):
        store.register_stage(elsewhere)
    with pytest.raises(storage.Damaged, match="adapter_model.safetensors"):
        Engine({"path": recipe.model.path}).add_adapter("cut", os.path.dirname(damaged))

    manifest = train(recipe)  # the finished run's weights are made again from its final checkpoint
    assert "adapter_model.safetensors is damaged" in capfd.readouterr().out
    assert manifest["global_step"] == 6
    again = _weights(recipe)
    for name, tensor in whole.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.extended
def test_a_cut_short_train_manifest_is_named_by_readers_and_the_stage_finishes_again(toy_run, tmp_path):
    from raytune_app.evaluate.run import EvaluateError, evaluate
    from raytune_app.registry import store
    from raytune_app.train.run import train

    recipe = _copy_of(toy_run, tmp_path)
    whole = _weights(recipe)
    _cut(os.path.join(recipe.stage_dir("train"), "manifest.json"))
    with pytest.raises(EvaluateError, match="manifest.json is damaged"):
        evaluate(recipe)
    with pytest.raises(store.RegistryError, match="manifest.json is damaged"):
        store.register_stage(recipe)
    manifest = train(recipe)  # not done: the run continues from its (final) checkpoint
    assert manifest["global_step"] == 6 and storage.load_json(os.path.join(recipe.stage_dir("train"), "manifest.json"))
    for name, tensor in whole.items():
        torch.testing.assert_close(_weights(recipe)[name], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.extended
def test_a_damaged_checkpoint_stops_a_resume_by_name_and_a_damaged_ray_record_starts_over(toy_run, tmp_path):
    from raytune_app.train.run import TrainError, train

    recipe = _copy_of(toy_run, tmp_path)
    train_dir = recipe.stage_dir("train")
    os.remove(os.path.join(train_dir, "manifest.json"))  # an interrupted run: resumed from its checkpoint
    checkpoint = json.load(open(os.path.join(train_dir, "checkpoint_manager_snapshot.json")))
    checkpoint = checkpoint["latest_checkpoint_result"]["checkpoint_dir_name"]  # what a resume loads
    optimizer = os.path.join(train_dir, checkpoint, "checkpoint", "optimizer.pt")
    whole = open(optimizer, "rb").read()
    _cut(optimizer)
    with pytest.raises(TrainError, match=f"{checkpoint}/checkpoint/optimizer.pt is damaged.*--restart"):
        train(recipe)
    open(optimizer, "wb").write(whole)

    _cut(os.path.join(train_dir, "checkpoint_manager_snapshot.json"))
    manifest = train(recipe)  # Ray's record is unreadable: the run is moved aside and trained again
    assert manifest["global_step"] == 6
    assert [d for d in os.listdir(recipe.run_dir) if d.startswith("train.previous-")]
    weights = _weights(recipe)
    for name, tensor in _weights(toy_run[0]).items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=1e-4)


def test_a_cut_short_prepared_manifest_means_not_prepared(tiny_model, tmp_path, capfd):
    from raytune_app.data.prepare import NotPrepared, current_manifest, prepare

    recipe = toy_recipe(tmp_path, tiny_model)
    prepare_once(recipe)  # prepared data only: nothing here needs a trained run
    manifest_path = os.path.join(recipe.stage_dir("prepare"), "manifest.json")
    whole = json.load(open(manifest_path))
    _cut(manifest_path)
    with pytest.raises(NotPrepared, match="manifest.json is damaged"):
        current_manifest(recipe)
    again = prepare(recipe)
    assert "manifest.json is damaged" in capfd.readouterr().err
    assert {s: v["content_hash"] for s, v in again["splits"].items()} == {
        s: v["content_hash"] for s, v in whole["splits"].items()
    }


@pytest.fixture
def small_device(tmp_path):
    """A real 4 MiB tmpfs for the run directory (root only; unmounted after)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.extended
def test_a_full_disk_names_the_folder_and_space_keeps_the_old_output_and_the_next_run_succeeds(
    small_device, tiny_model, tmp_path, capsys
):
    from conftest import TOY_ANSWERS, TOY_SCHEMA

    from raytune_app import cli

    # 2,000 rows: a prepared output of well over 100 KiB, far more than the space left below.
    source = tmp_path / "toy.jsonl"
    source.write_text(
        "".join(
            json.dumps({"q": f"ticket {i}: classify, word {i % 7}", "a": TOY_ANSWERS[i % 3], "channel": "mail"}) + "\n"
            for i in range(2000)
        )
    )
    (tmp_path / "schema.json").write_text(json.dumps(TOY_SCHEMA))
    resolved = toy_recipe(tmp_path, tiny_model).resolved()
    recipe = config.validate(
        resolved
        | {"run": resolved["run"] | {"output_dir": str(small_device)}}
        | {"data": resolved["data"] | {"sources": [str(source)]}}  # the 2,000 rows, not the shared toy set
    )
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(__import__("yaml").safe_dump(recipe.resolved(), sort_keys=False))
    args = ["prepare", "--recipe", str(recipe_file)]
    assert cli.main(args) == 0
    out_dir = recipe.stage_dir("prepare")
    before = {name: open(os.path.join(out_dir, name), "rb").read() for name in ("manifest.json", "rejected.jsonl")}
    files_before = sorted(os.listdir(os.path.join(out_dir, "train")))
    size = storage.tree_size(out_dir)
    assert size > 100 * 1024, size

    # Fill the device but for 32 KiB: room for the resolved recipe the command saves first, not for the new output.
    ballast = small_device / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_device).free - 32 * 1024))
    capsys.readouterr()
    assert cli.main([*args, "--force"]) == errors.EXIT_NO_SPACE
    error = capsys.readouterr().err
    assert f"no space left on the device holding {out_dir}" in error, error
    assert "the prepared data needs more than" in error and "previous output is intact" in error, error
    assert {name: open(os.path.join(out_dir, name), "rb").read() for name in before} == before
    assert sorted(os.listdir(os.path.join(out_dir, "train"))) == files_before
    # No half-written version left (the log file is the run's console log).
    assert sorted(os.listdir(recipe.run_dir)) == ["prepare", "raytune-app.log", "recipe.yaml"]

    ballast.unlink()  # space again: the next run succeeds, with the same data
    assert cli.main([*args, "--force"]) == 0
    after = json.load(open(os.path.join(out_dir, "manifest.json")))
    assert {s: v["content_hash"] for s, v in after["splits"].items()} == {
        s: v["content_hash"] for s, v in json.loads(before["manifest.json"])["splits"].items()
    }
