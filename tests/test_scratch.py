"""Runs of one recipe never read each other's checkpoints: the workers' node-local scratch is per run and
attempt (raytune_app/train/scratch.py), a killed run resumes from its own durable checkpoint, and nothing
is left in the temp directory once a run ends.

The kill is real: `raytune-app train` in its own process group (with its own local Ray), SIGKILLed as a
whole after its first checkpoint, then `raytune-app train --resume` as a user would type it.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from raytune_app import config
from raytune_app.data.prepare import prepare
from raytune_app.train import scratch
from raytune_app.train.run import train

ANSWERS = ['{"status": "ok"}', '{"status": "refund"}', '{"status": "late"}']


def write_recipe(root, tiny_model, name: str) -> str:
    source = root / "toy.jsonl"
    if not source.exists():
        source.write_text(
            "".join(
                json.dumps({"q": f"ticket {i}: classify, word {i % 7}", "a": ANSWERS[i % 3]}) + "\n" for i in range(96)
            )
        )
    raw = {
        "run": {"name": name, "output_dir": str(root / "runs")},
        "model": {"path": tiny_model},
        "data": {"sources": [str(source)], "columns": {"prompt": "q", "response": "a"}, "max_seq_length": 128},
        "train": {
            "workers": 1,
            "max_steps": 8,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "warmup": 0,
            "logging_steps": 1,
            "max_failures": 0,
            "checkpoint": {"every_steps": 2, "keep_best": 1},
            "lora": {"rank": 4, "dropout": 0.1},
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def weights(train_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(train_dir, "adapter", "adapter_model.safetensors"))


def durable_steps(train_dir: str) -> list[int]:
    """The trainer-state step of every checkpoint Ray Train kept for this run."""
    states = glob.glob(os.path.join(train_dir, "checkpoint_*", scratch.CHECKPOINT_NAME, "trainer_state.json"))
    return sorted(json.load(open(path))["global_step"] for path in states)


def _checkpointed(train_dir: str) -> bool:
    """Whether Ray Train holds a checkpoint of this run yet (one being copied in counts as not yet)."""
    try:
        return bool(durable_steps(train_dir))
    except (OSError, ValueError):
        return False


def cli(*args: str) -> tuple[list[str], dict]:
    # RAY_ADDRESS=local: the CLI starts its own Ray, never joins another cluster running on this machine.
    env = os.environ | {"RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "raytune_app.cli", *args], env


@pytest.mark.extended
@pytest.mark.usefixtures("ray_local")
def test_killed_run_resumes_from_its_own_checkpoint_not_another_runs(tmp_path, tiny_model):
    # Run "a" finishes, leaving (before the fix) checkpoints of steps 6 and 8 in the shared scratch folder.
    recipe_a = config.load(write_recipe(tmp_path, tiny_model, "a"))
    prepare(recipe_a)
    train(recipe_a)
    assert not os.path.exists(scratch.run_scratch(recipe_a.stage_dir("train")))

    # Run "b": the same recipe under another name, killed (driver, raylet, workers: the whole process
    # group) as soon as Ray Train holds its first durable checkpoint (step 2).
    recipe_b_path = write_recipe(tmp_path, tiny_model, "b")
    recipe_b = config.load(recipe_b_path)
    prepare(recipe_b)
    train_b = recipe_b.stage_dir("train")
    command, env = cli("train", "--recipe", recipe_b_path)
    with open(tmp_path / "b.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        try:
            while not _checkpointed(train_b) and driver.poll() is None and time.time() < deadline:
                time.sleep(0.1)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
    assert durable_steps(train_b), (tmp_path / "b.log").read_text()[-3000:]
    assert not os.path.exists(os.path.join(train_b, "manifest.json"))
    # Its durable checkpoints are its own (steps <= 3), never run a's step 6 or 8.
    kept = durable_steps(train_b)
    assert kept and max(kept) <= 3, kept

    command, env = cli("train", "--recipe", recipe_b_path, "--resume")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from step {max(kept)}" in resumed.stdout, resumed.stdout[-3000:]
    manifest = json.load(open(os.path.join(train_b, "manifest.json")))
    assert manifest["global_step"] == 8
    steps = [json.loads(line)["step"] for line in open(os.path.join(train_b, "metrics.jsonl"))]
    assert steps == sorted(steps) and steps[-1] == 8

    a, b = weights(recipe_a.stage_dir("train")), weights(train_b)
    assert a.keys() == b.keys()
    for key in a:  # resumed exactly: the same weights as the uninterrupted run
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    # The killed attempt's scratch was removed by the resumed attempt, which removed its own when it ended.
    assert not os.path.exists(scratch.run_scratch(train_b))


@pytest.mark.extended
@pytest.mark.usefixtures("ray_local")
def test_two_concurrent_runs_of_one_recipe_keep_their_own_checkpoints(tmp_path, tiny_model):
    # Side by side on one machine, as two users would: one `raytune-app train` process (its own Ray), one
    # in this process; both use this node's temp directory.
    paths = [write_recipe(tmp_path, tiny_model, name) for name in ("left", "right")]
    recipes = [config.load(path) for path in paths]
    for recipe in recipes:
        prepare(recipe)
    command, env = cli("train", "--recipe", paths[0])
    other = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        train(recipes[1])
        out, _ = other.communicate(timeout=900)
    finally:
        other.kill()
    assert other.returncode == 0, out[-3000:]
    for recipe in recipes:
        train_dir = recipe.stage_dir("train")
        assert json.load(open(os.path.join(train_dir, "manifest.json")))["global_step"] == 8
        # Best 1 by validation loss plus the latest, each holding the state of a step this run saved.
        kept = durable_steps(train_dir)
        assert 8 in kept and set(kept) <= {2, 4, 6, 8}, kept
        history = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl"))]
        assert [h["step"] for h in history if "loss" in h] == list(range(1, 9))
        assert not os.path.exists(scratch.run_scratch(train_dir))
    left, right = (weights(recipe.stage_dir("train")) for recipe in recipes)
    for key in left:  # the same recipe and seed, trained side by side: the same result
        torch.testing.assert_close(left[key], right[key], atol=1e-5, rtol=1e-4)


def test_scratch_is_keyed_by_output_location(tmp_path):
    one, two = scratch.run_scratch(str(tmp_path / "a" / "train")), scratch.run_scratch(str(tmp_path / "b" / "train"))
    assert one != two and scratch.run_scratch(str(tmp_path / "a" / "train")) == one
    assert scratch.run_scratch("s3://bucket/runs/a/train") != scratch.run_scratch("s3://bucket/runs/b/train")
