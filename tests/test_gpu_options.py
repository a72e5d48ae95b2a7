"""The GPU training options (attention kernel, Liger, 8-bit optimizers, FSDP2) on a CPU machine: each validates,
is refused with its reason where it cannot apply, and reaches TRL's training arguments; FSDP2 (which runs on
CPU with gloo) trains a tiny LoRA model with two Ray Train workers."""

import pytest

from raytune_app import config, fit, resources
from raytune_app.train.arguments import training_arguments
from raytune_app.train.model import attention_kernel, choose_sdpa_backends
from raytune_app.train.run import check_packages


def recipe(**train):
    return config.validate({"data": {"sources": ["x.jsonl"]}, "train": train})


def test_each_option_validates_or_names_why_not():
    assert recipe(attn_implementation="flash_attention_2", liger=True, optimizer="paged_adamw_8bit").train.liger
    assert recipe(sharding="fsdp", fsdp={"cpu_offload": True}).train.fsdp.cpu_offload
    refusals = {
        "needs a GPU and use_gpu is false": dict(attn_implementation="flash_attention_2", use_gpu=False),
        "flex_attention needs a GPU": dict(attn_implementation="flex_attention", use_gpu=False),
        "liger kernels run on GPUs": dict(liger=True, use_gpu=False),
        "exclude each other": dict(sharding="fsdp", deepspeed={"stage": 2}),
        "set sharding to deepspeed": dict(sharding="ddp", deepspeed={"stage": 2}),
        "compute_dtype: bfloat16": dict(sharding="fsdp", finetuning="qlora", quantization={"compute_dtype": "float32"}),
    }
    for reason, settings in refusals.items():
        with pytest.raises(config.RecipeError, match=reason):
            recipe(**settings)


def test_gpu_only_kernels_are_refused_on_cpu_workers_before_training():
    gpu_only_setups = (
        recipe(liger=True),
        recipe(attn_implementation="flash_attention_2"),
        recipe(attn_implementation="flex_attention"),  # its backward has no CPU kernel
    )
    for gpu_only in gpu_only_setups:
        plan = resources.plan_workers(gpu_only.train, gpus=0, cpus=8)  # the rule train.check_resources applies
        assert any("run on GPUs and the workers get none" in p for p in plan.problems)
        report = fit.check(gpu_only, gpus=0, cpus=8)
        assert not report.ok and any("run on GPUs" in p for p in report.problems)
    check_packages(recipe(optimizer="adamw_8bit"), use_gpu=False)  # bitsandbytes' 8-bit AdamW runs on CPU too
    report = fit.check(recipe(liger=True, sharding="fsdp", workers=4, attn_implementation="flash_attention_2"), gpus=8)
    assert report.ok and any("FSDP2" in line and "Liger" in line for line in report.fits)
    assert any("liger-kernel and flash-attn" in note for note in report.notes)


def test_auto_attention_is_sdpa_on_cpu():
    assert attention_kernel("auto", on_gpu=False) == "sdpa"
    assert attention_kernel("eager", on_gpu=False) == "eager"


def test_sdpa_training_on_a_gpu_turns_off_cudnn_attention_and_nothing_else_does():
    """cuDNN's attention builds a plan per sequence shape on the host (BENCHMARKS.md, "GPU path"): training with
    sdpa on a GPU leaves it to PyTorch's own kernels. The switch is a process-wide flag, readable on CPU too."""
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        choose_sdpa_backends("sdpa", on_gpu=False)
        choose_sdpa_backends("flex_attention", on_gpu=True)
        choose_sdpa_backends("flash_attention_2", on_gpu=True)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        choose_sdpa_backends("sdpa", on_gpu=True)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_options_reach_the_training_arguments(tmp_path, one_process_group):
    args = training_arguments(recipe(optimizer="adamw_8bit"), str(tmp_path), False, packed=False, ds_config=None)
    assert args.optim == "adamw_bnb_8bit" and not args.fsdp
    args = training_arguments(
        recipe(
            sharding="fsdp", fsdp={"cpu_offload": True, "reshard_after_forward": False}, gradient_checkpointing=True
        ),
        str(tmp_path),
        False,
        packed=False,
        ds_config=None,
    )
    plugin = args.fsdp_plugin_args  # what accelerate's FSDP plugin is built from
    assert args.fsdp and plugin["fsdp_version"] == 2 and plugin["cpu_offload"] and not plugin["reshard_after_forward"]
    # Activation checkpointing under FSDP is FSDP's own, not the trainer's.
    assert plugin["activation_checkpointing"] and not args.gradient_checkpointing


@pytest.mark.slow
@pytest.mark.extended
def test_fsdp2_trains_lora_with_two_cpu_workers(ray_local, tmp_path, tiny_model):
    import json
    import os

    from conftest import toy_recipe

    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train

    run = toy_recipe(tmp_path, tiny_model, workers=2, sharding="fsdp", max_steps=6)
    prepare(run)
    manifest = train(run)
    assert manifest["global_step"] == 6
    losses = [json.loads(line).get("loss") for line in open(os.path.join(run.stage_dir("train"), "metrics.jsonl"))]
    losses = [loss for loss in losses if loss is not None]
    assert losses[-1] < losses[0]
    assert os.path.exists(os.path.join(manifest["weights"], "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.extended
def test_the_gpu_check_script_builds_and_validates_every_variant_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run, what can be checked of the GPU run on any machine: the ~0.5B model
    is built (a smaller one here), every variant's recipe validates for a 1-GPU worker, and the table prints."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    from gpu_check import VARIANTS

    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--hidden",
            "128",
            "--layers",
            "2",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(VARIANTS), done.stdout
    assert all("plan train: 1 worker(s) x 1 GPU" in row for row in rows), rows
