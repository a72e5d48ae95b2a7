"""Recipe -> TRL training arguments, one builder per method (pure: no Ray, no model; tested without training).

    args = training_arguments(recipe, output_dir, use_gpu=False, packed=True, ds_config=None)

Every method shares `_common_arguments` (optimisation, precision, checkpoint cadence, devices, logging);
each method's own section (`train.dpo`, `train.orpo`, ...) adds its fields. The Ray Train worker
(raytune_app/train/worker.py) builds the trainer with what these return.
"""

from __future__ import annotations

from raytune_app import models
from raytune_app.config import Recipe

# train.optimizer -> the name transformers' Trainer knows it by.
OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def fsdp_arguments(train) -> dict:
    """TrainingArguments fields for `sharding: fsdp`: FSDP2 through accelerate, each decoder layer its own unit."""
    if train.sharding != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "cpu_offload": train.fsdp.cpu_offload,
            "reshard_after_forward": train.fsdp.reshard_after_forward,
            # Activation checkpointing under FSDP is FSDP's own (the trainer's would wrap the sharded layers twice).
            "activation_checkpointing": train.gradient_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def _checkpointing_argument(enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers reads: `activation_checkpointing` from
    5.2x on (the old `gradient_checkpointing` still works there, with a FutureWarning per run)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _common_arguments(recipe: Recipe, output_dir: str, use_gpu: bool, ds_config: dict | None) -> dict:
    """TrainingArguments fields every method shares: optimisation, precision, cadence, devices, logging."""
    train = recipe.train
    length = {"max_steps": train.max_steps} if train.max_steps else {"num_train_epochs": train.epochs}
    precision = models.compute_precision(train.precision, use_gpu)  # fp32 on a CPU without native bf16
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler if train.scheduler != "constant" else "constant_with_warmup",
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # FSDP checkpoints activations itself (fsdp_arguments)
        **_checkpointing_argument(train.gradient_checkpointing and train.sharding != "fsdp"),
        logging_steps=train.logging_steps,
        eval_strategy="steps",
        eval_steps=train.checkpoint.every_steps,
        save_strategy="steps",
        save_steps=train.checkpoint.every_steps,
        save_total_limit=2,  # local scratch only; Ray Train keeps the durable copies
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        report_to=[target for target in train.report_to if target != "mlflow"],  # MLflow: see train/run.py
        run_name=recipe.run.name,
        use_cpu=not use_gpu,
        ddp_backend=None if use_gpu else "gloo",
        # Every parameter takes part in every step (LoRA or not); searching for unused ones costs a
        # traversal of the autograd graph per step.
        ddp_find_unused_parameters=False,
        deepspeed=ds_config,
        optim=OPTIMIZERS[train.optimizer],
        use_liger_kernel=train.liger,
        **fsdp_arguments(train),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        warmup_steps=train.warmup,  # transformers reads a value below 1 as a fraction of all steps, as we do
        **length,
    )


def training_arguments(recipe: Recipe, output_dir: str, use_gpu: bool, packed: bool, ds_config: dict | None):
    """TRL's SFT arguments from the recipe.

    Batching: packed data is fed padding-free (examples concatenated, position ids restarting at each
    one, so attention stays inside each example). Unpacked data is fed as padded batches of similar
    lengths (`group_by_length`): on CPU, and on GPU without a varlen flash-attention kernel, attention
    over one long concatenated sequence with a block mask costs more than the little padding left
    after grouping by length (measured: benchmarks/train_throughput.py, BENCHMARKS.md).
    """
    from trl import SFTConfig

    return SFTConfig(
        **_common_arguments(recipe, output_dir, use_gpu, ds_config),
        # Data arrives tokenised (and packed) from the prepare stage.
        dataset_kwargs={"skip_prepare_dataset": True},
        completion_only_loss=True,
        padding_free=packed,
        train_sampling_strategy="random" if packed else "group_by_length",
        max_length=None,
        include_num_input_tokens_seen="non_padding",
    )


def dpo_arguments(recipe: Recipe, output_dir: str, use_gpu: bool, ds_config: dict | None):
    """TRL's DPO arguments: the pairs are tokenised by the trainer with the model's chat template."""
    from trl import DPOConfig

    dpo = recipe.train.dpo
    return DPOConfig(
        **_common_arguments(recipe, output_dir, use_gpu, ds_config),
        beta=dpo.beta,
        loss_type=dpo.losses,
        loss_weights=dpo.loss_weights,
        label_smoothing=dpo.label_smoothing,
        precompute_ref_log_probs=dpo.precompute_reference,
        max_length=dpo.max_length or recipe.data.max_seq_length,
        # The prompt is what a long pair keeps; the end of the answers is cut.
        truncation_mode="keep_start",
        include_num_input_tokens_seen="non_padding",
    )


def grpo_arguments(
    recipe: Recipe,
    output_dir: str,
    use_gpu: bool,
    ds_config: dict | None,
    reward_weights: list[float],
):
    """TRL's GRPO arguments. `batch_size` counts completions: batch_size / num_generations prompts per step."""
    from trl import GRPOConfig

    grpo = recipe.train.grpo
    return GRPOConfig(
        **_common_arguments(recipe, output_dir, use_gpu, ds_config),
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        beta=grpo.beta,
        epsilon=grpo.epsilon,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        reward_weights=reward_weights,
        log_completions=False,
    )


def _pair_length(recipe: Recipe, section) -> int:
    return section.max_length or recipe.data.max_seq_length


def orpo_arguments(recipe: Recipe, output_dir: str, use_gpu: bool, ds_config: dict | None):
    """TRL's ORPO arguments (trl.experimental.orpo): SFT loss + beta x odds-ratio loss, no reference model."""
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(
        **_common_arguments(recipe, output_dir, use_gpu, ds_config),
        beta=recipe.train.orpo.beta,
        max_length=_pair_length(recipe, recipe.train.orpo),
    )


def simpo_arguments(recipe: Recipe, output_dir: str, use_gpu: bool, ds_config: dict | None):
    """SimPO through TRL's CPO trainer (trl.experimental.cpo) with its `simpo` loss: a length-normalised reward
    margin with a target gap, no reference model; `sft_weight` > 0 adds CPO's NLL term (CPO-SimPO)."""
    from trl.experimental.cpo import CPOConfig

    simpo = recipe.train.simpo
    return CPOConfig(
        **_common_arguments(recipe, output_dir, use_gpu, ds_config),
        loss_type="simpo",
        beta=simpo.beta,
        simpo_gamma=simpo.gamma_beta_ratio,
        cpo_alpha=simpo.sft_weight,
        max_length=_pair_length(recipe, simpo),
    )


def kto_arguments(recipe: Recipe, output_dir: str, use_gpu: bool, ds_config: dict | None):
    """TRL's KTO arguments: each answer is judged desirable or not on its own (the pairs, unpaired)."""
    from trl import KTOConfig

    kto = recipe.train.kto
    return KTOConfig(
        **_common_arguments(recipe, output_dir, use_gpu, ds_config),
        beta=kto.beta,
        desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight,
        max_length=_pair_length(recipe, kto),
    )
