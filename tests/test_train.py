"""The train stage on a real local Ray: TRL SFTTrainer in Ray Train workers, tiny random Llama.

A small learnable set (every answer is one of a few fixed JSON strings) is prepared once per module;
each test gets a copy of that prepared data in its own run directory (conftest.prepare_once: the
prepare stage finds it unchanged and reuses it), then trains a few steps. Two workers use gloo on CPU. A fault injected
after a step (FAULT_ENV) stands in for a worker that dies: with restarts left, Ray Train restarts the
workers from the latest checkpoint; without, the run stops and `--resume` continues it.
"""

import json
import os

import pytest
import ray.train
import torch
from conftest import prepare_once

from raytune_app import config
from raytune_app.train.run import TrainError, train
from raytune_app.train.worker import FAULT_ENV

pytestmark = pytest.mark.usefixtures("ray_local")

ANSWERS = ['{"status": "ok"}', '{"status": "refund"}', '{"status": "late"}']


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    with path.open("w") as out:
        for i in range(96):
            out.write(json.dumps({"q": f"ticket {i}: please classify, word {i % 7}", "a": ANSWERS[i % 3]}) + "\n")
    return path


def make_recipe(tmp_path, tiny_model, source, data=None, **train):
    raw = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "model": {"path": tiny_model},
        "data": {
            "sources": [str(source)],
            "columns": {"prompt": "q", "response": "a"},
            "max_seq_length": 128,
            "packing": True,
            "split": {"val": 0.15, "test": 0.05},
            **(data or {}),
        },
        "train": {
            "workers": 2,
            "max_steps": 8,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "warmup": 0,
            "logging_steps": 2,
            "checkpoint": {"every_steps": 4, "keep_best": 1},
            "lora": {"rank": 8, "dropout": 0.0},
            **train,
        },
    }
    recipe = config.validate(raw)
    assert prepare_once(recipe)["rows_in"] == 96  # one Ray Data pass per module; the other tests reuse it
    return recipe


def history(recipe):
    return [json.loads(line) for line in open(os.path.join(recipe.stage_dir("train"), "metrics.jsonl"))]


def adapter_weights(recipe):
    from safetensors.torch import load_file

    return load_file(os.path.join(recipe.stage_dir("train"), "adapter", "adapter_model.safetensors"))


@pytest.mark.extended
def test_lora_two_workers_learn_survive_a_lost_worker_and_write_everything(
    tmp_path, tiny_model, toy_source, monkeypatch
):
    # A worker dies after step 6; Ray Train restarts both from the step-4 checkpoint (max_failures 1).
    recipe = make_recipe(tmp_path, tiny_model, toy_source, max_steps=12, max_failures=1)
    monkeypatch.setenv(FAULT_ENV, "6")
    manifest = train(recipe)
    monkeypatch.delenv(FAULT_ENV)
    assert os.path.exists(os.path.join(recipe.stage_dir("train"), "fault-injected"))
    losses = [h["loss"] for h in history(recipe) if "loss" in h]
    assert losses[-1] < losses[0] * 0.92, losses  # a tiny random model learns slowly; noise is ~2%
    assert manifest["global_step"] == 12 and manifest["workers"] == 2 and not manifest["use_gpu"]
    assert manifest["final_eval_loss"] < [h["eval_loss"] for h in history(recipe) if "eval_loss" in h][0]
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_mb"] > 0 for h in history(recipe) if "loss" in h)
    train_dir = recipe.stage_dir("train")
    for name in (
        "loss_curve.png",
        "recipe.yaml",
        "manifest.json",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
    ):
        assert os.path.exists(os.path.join(train_dir, name)), name
    # (After a restart Ray Train also keeps checkpoint_manager_snapshot.json there: folders only.)
    checkpoints = [
        d for d in os.listdir(train_dir) if d.startswith("checkpoint_") and os.path.isdir(os.path.join(train_dir, d))
    ]
    assert 1 <= len(checkpoints) <= 2  # best 1 by validation loss, plus the latest

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), os.path.join(train_dir, "adapter")
    )
    assert tuned.peft_config["default"].r == 8 and tuned.peft_config["default"].lora_alpha == 32

    again = train(recipe)  # finished with the same fingerprint: nothing is retrained
    assert again == manifest


@pytest.mark.extended
def test_an_interrupted_run_resumes_exactly_and_resume_refuses_what_it_cannot_continue(
    tmp_path, tiny_model, toy_source, monkeypatch
):
    straight = make_recipe(tmp_path / "a", tiny_model, toy_source, workers=1, lora={"rank": 4, "dropout": 0.1})
    train(straight)

    broken = make_recipe(
        tmp_path / "b", tiny_model, toy_source, workers=1, max_failures=0, lora={"rank": 4, "dropout": 0.1}
    )
    with pytest.raises(TrainError, match="nothing to resume"):
        train(broken, resume=True)
    monkeypatch.setenv(FAULT_ENV, "5")  # dies after step 5; the last checkpoint is step 4
    with pytest.raises(ray.train.TrainingFailedError):
        train(broken)
    monkeypatch.delenv(FAULT_ENV)
    assert not os.path.exists(os.path.join(broken.stage_dir("train"), "manifest.json"))
    changed = config.validate(broken.resolved() | {"train": broken.resolved()["train"] | {"learning_rate": 1e-3}})
    with pytest.raises(TrainError, match="cannot resume: the recipe or the prepared data changed"):
        train(changed, resume=True)
    resumed = train(broken, resume=True)
    assert resumed["global_step"] == 8
    steps = [h["step"] for h in history(broken) if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # the step counter continued, nothing logged twice
    a, b = adapter_weights(straight), adapter_weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.extended
def test_qlora_on_cpu(tmp_path, tiny_model, toy_source):
    recipe = make_recipe(
        tmp_path,
        tiny_model,
        toy_source,
        workers=1,
        max_steps=4,
        finetuning="qlora",
        quantization={"compute_dtype": "float32"},
    )
    manifest = train(recipe)
    assert manifest["global_step"] == 4 and manifest["finetuning"] == "qlora"
    assert os.path.exists(os.path.join(manifest["weights"], "adapter_model.safetensors"))


@pytest.mark.extended
def test_deepspeed_zero2_two_workers(tmp_path, tiny_model, toy_source):
    recipe = make_recipe(tmp_path, tiny_model, toy_source, max_steps=4, deepspeed={"stage": 2})
    manifest = train(recipe)
    assert manifest["global_step"] == 4
    losses = [h["loss"] for h in history(recipe) if "loss" in h]
    assert all(loss == loss for loss in losses)  # finite, NaN-free


def test_invalid_setups_fail_before_workers_start(tmp_path, tiny_model, toy_source):
    with pytest.raises(TrainError, match="train.workers=8 needs 8 CPUs, the cluster has 2"):
        train(make_recipe(tmp_path, tiny_model, toy_source, workers=8))
    with pytest.raises(TrainError, match="fp16 needs a GPU"):
        train(make_recipe(tmp_path / "b", tiny_model, toy_source, precision="fp16"))
    stale = make_recipe(tmp_path / "c", tiny_model, toy_source)
    changed = config.validate(stale.resolved() | {"data": stale.resolved()["data"] | {"max_seq_length": 100}})
    with pytest.raises(TrainError, match="was made from other data or settings than this recipe's"):
        train(changed)
    with pytest.raises(TrainError, match="no prepared data"):
        train(config.validate({"run": {"output_dir": str(tmp_path / "none")}, "data": {"sources": ["x.jsonl"]}}))


@pytest.mark.extended
def test_multi_stage_chain_continues_from_the_previous_adapter(tmp_path, tiny_model, toy_source, write_jsonl):
    style = write_jsonl(
        "style.jsonl",
        [{"q": f"ticket {i}: reply politely", "a": '{"status": "ok", "tone": "polite"}'} for i in range(48)],
    )
    recipe = make_recipe(tmp_path, tiny_model, toy_source, workers=1, max_steps=4)
    recipe = config.validate(
        recipe.resolved()
        | {
            "chain": [
                {"name": "task", "train": {"max_steps": 4}},
                {"name": "style", "data": {"sources": [str(style)]}, "train": {"learning_rate": 1e-3}},
            ]
        }
    )
    from raytune_app.train.run import train_chain

    final = train_chain(recipe)
    task, style_step = final["chain"]
    assert style_step["parent_fingerprint"] == task["fingerprint"] and final["parent_adapter"] == task["weights"]
    lineage = json.load(open(os.path.join(recipe.run_dir, "chain.json")))
    assert [s["step"] for s in lineage["chain"]] == ["task", "style"] and lineage["weights"] == style_step["weights"]
    from safetensors.torch import load_file

    first = load_file(os.path.join(task["weights"], "adapter_model.safetensors"))
    second = load_file(os.path.join(style_step["weights"], "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # Re-running the chain with nothing changed retrains nothing.
    assert train_chain(recipe)["fingerprint"] == final["fingerprint"]


@pytest.mark.extended
def test_deepspeed_zero3_two_workers_saves_whole_adapter(tmp_path, tiny_model, toy_source):
    recipe = make_recipe(
        tmp_path,
        tiny_model,
        toy_source,
        max_steps=2,
        deepspeed={"stage": 3},
        checkpoint={"every_steps": 2, "keep_best": 1},
    )
    manifest = train(recipe)
    assert manifest["global_step"] == 2
    weights = adapter_weights(recipe)  # gathered from the shards: full-size LoRA matrices
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any(t.shape[0] == 8 or t.shape[1] == 8 for t in weights.values())  # rank 8 survives the gather
