"""Recipe -> library mappings, without Ray: what each recipe field becomes in TRL's training arguments,
PEFT's LoRA config, bitsandbytes' 4-bit config and the DeepSpeed config. The training tests
(test_train.py, test_preference.py) prove these objects train; these prove each field lands where it
should, in a second or two each."""

import json

import pytest
import torch

from raytune_app import config
from raytune_app.train.arguments import dpo_arguments, grpo_arguments, training_arguments
from raytune_app.train.deepspeed import deepspeed_config
from raytune_app.train.model import lora_config, quantization_config
from raytune_app.train.settings import DeepSpeedSection


def recipe(kind="prompt_response", **train):
    return config.validate({"data": {"sources": ["x.jsonl"], "kind": kind}, "train": train})


def test_lora_fields_reach_peft():
    lora = lora_config(recipe(lora={"rank": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}).train)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 32.0, 0.1)  # alpha: 4 x rank unless given
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.task_type == "CAUSAL_LM"
    assert lora_config(recipe(lora={"rank": 4, "alpha": 6}).train).lora_alpha == 6
    assert lora_config(recipe(lora={"target_modules": "all-linear"}).train).target_modules == "all-linear"


def test_qlora_fields_reach_bitsandbytes():
    quant = quantization_config(
        recipe(finetuning="qlora", quantization={"quant_type": "fp4", "double_quant": False}).train
    )
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "fp4" and not quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16  # the section's default


def test_sft_arguments_follow_the_recipe(tmp_path, one_process_group, monkeypatch):
    from raytune_app import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)  # a CPU with native bf16 trains in bf16
    r = recipe(
        max_steps=12,
        batch_size=3,
        gradient_accumulation=2,
        learning_rate=1e-3,
        scheduler="constant",
        warmup=0.1,
        weight_decay=0.01,
        max_grad_norm=0.5,
        precision="bf16",
        logging_steps=3,
        checkpoint={"every_steps": 4},
    )
    args = training_arguments(r, str(tmp_path), use_gpu=False, packed=True, ds_config=None)
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (12, 3, 2)
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (1e-3, 0.01, 0.5)
    # "constant" keeps its warm-up: transformers' plain constant schedule would ignore it.
    assert args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 0.1
    assert args.bf16 and not args.fp16 and args.use_cpu and args.ddp_backend == "gloo"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)  # emulated bf16 is many times slower: fp32
    emulated = training_arguments(r, str(tmp_path), use_gpu=False, packed=True, ds_config=None)
    assert not emulated.bf16 and not emulated.fp16
    # Evaluation and checkpoints share the cadence: every checkpoint is ranked by its validation loss.
    assert args.eval_steps == args.save_steps == 4 and args.logging_steps == 3
    assert args.seed == args.data_seed == r.run.seed and args.report_to == []
    assert args.padding_free and args.completion_only_loss  # packed data trains padding-free
    checkpointing = training_arguments(recipe(gradient_checkpointing=True), str(tmp_path), False, False, None)
    assert getattr(checkpointing, "activation_checkpointing", None) or checkpointing.gradient_checkpointing
    unpacked = training_arguments(recipe(epochs=2, warmup=5), str(tmp_path), use_gpu=True, packed=False, ds_config=None)
    assert unpacked.num_train_epochs == 2 and unpacked.max_steps == -1 and unpacked.warmup_steps == 5
    assert not unpacked.padding_free and unpacked.train_sampling_strategy == "group_by_length"
    assert not unpacked.use_cpu and unpacked.ddp_backend is None


def test_dpo_and_grpo_arguments_follow_their_sections(tmp_path, one_process_group):
    r = recipe(
        kind="preference", method="dpo", dpo={"beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.1}, max_steps=4
    )
    dpo = dpo_arguments(r, str(tmp_path), use_gpu=False, ds_config=None)
    assert dpo.beta == 0.3 and dpo.loss_type == ["ipo"] and dpo.label_smoothing == 0.1
    assert dpo.max_length == r.data.max_seq_length  # dpo.max_length left out: the data's
    grpo_recipe = recipe(
        method="grpo",
        max_steps=4,
        batch_size=4,
        grpo={"num_generations": 2, "max_completion_length": 16, "beta": 0.0, "rewards": [{"function": "json_valid"}]},
    )
    grpo = grpo_arguments(grpo_recipe, str(tmp_path), use_gpu=False, ds_config=None, reward_weights=[1.0])
    assert (grpo.num_generations, grpo.max_completion_length, grpo.beta) == (2, 16, 0.0)
    assert grpo.reward_weights == [1.0] and grpo.loss_type == "dapo"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_zero_stage(stage):
    ds = deepspeed_config(DeepSpeedSection(stage=stage), use_gpu=False)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and not zero["overlap_comm"]
    assert ("reduce_scatter" in zero) == (stage >= 2)
    # ZeRO-3 gathers whole weights at save time, so the adapter loads without DeepSpeed.
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    # Batch size, clipping, learning rate and precision come from the training arguments ("auto").
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_clipping"] == "auto"
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_offload_and_a_users_own_file(tmp_path):
    offload = deepspeed_config(DeepSpeedSection(stage=3, offload_optimizer=True, offload_params=True), use_gpu=True)
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert offload["optimizer"]["params"]["torch_adam"] is False  # CPU offload needs DeepSpeed's CPU Adam
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    mine = deepspeed_config(DeepSpeedSection(config_file="ds.json"), use_gpu=False, base_dir=str(tmp_path))
    assert mine == {"zero_optimization": {"stage": 1}}  # used as it is, relative to the recipe's folder
    with pytest.raises(FileNotFoundError, match=r"train.deepspeed.config_file: .*nothere.json not found"):
        deepspeed_config(DeepSpeedSection(config_file="nothere.json"), use_gpu=False, base_dir=str(tmp_path))


class _Evaluated:
    """A trainer as far as `_final_eval` reads one: transformers' own TrainerState, and an `evaluate` that
    counts its calls (a second pass over the validation split is what is being avoided)."""

    def __init__(self, step: int, log_history: list[dict]):
        from transformers import TrainerState

        self.state = TrainerState(global_step=step, log_history=log_history)
        self.calls = 0

    def evaluate(self) -> dict:
        self.calls += 1
        return {"eval_loss": 9.0}


def test_the_final_evaluation_comes_from_the_log_when_the_last_step_was_evaluated():
    from raytune_app.train.worker import _final_eval

    history = [
        {"loss": 1.0, "step": 2},
        {"eval_loss": 0.5, "epoch": 1.0, "step": 2},
        {"loss": 0.9, "step": 4},
        {"eval_loss": 0.4, "eval_runtime": 1.5, "epoch": 2.0, "step": 4},
        {"train_runtime": 3.0, "step": 4},
    ]
    evaluated = _Evaluated(4, history)
    assert _final_eval(evaluated) == {"eval_loss": 0.4, "eval_runtime": 1.5, "epoch": 2.0} and evaluated.calls == 0
    # The last step was not a checkpoint step (its last evaluation scored other weights): evaluate now.
    not_evaluated = _Evaluated(5, [*history, {"loss": 0.8, "step": 5}])
    assert _final_eval(not_evaluated) == {"eval_loss": 9.0} and not_evaluated.calls == 1
