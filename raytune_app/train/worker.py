"""What each Ray Train worker runs: TRL's SFTTrainer on the prepared Parquet splits.

Data is read per worker, straight from the prepared Parquet files, rather than streamed through Ray
Data: the splits are small next to the training compute (already tokenised and packed), and the
Hugging Face trainer's own seeded sampler then decides the order of batches. That is what makes
resume exact: a restored checkpoint carries the optimizer, scheduler, RNG states and step, and the
trainer skips the batches already seen in the epoch, so no example is seen twice.

Checkpoints: the trainer saves every `train.checkpoint.every_steps` steps (after evaluating) into a
node-local scratch folder of this run and attempt (raytune_app/train/scratch.py), and each save is
handed to Ray Train, which keeps the best K by validation loss (always keeping the latest) under the run
directory. On a restart (`--resume`, or Ray restarting failed workers) `ray.train.get_checkpoint()`
returns the latest one, copied into the new attempt's empty scratch, and training continues from it.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass

import torch

from raytune_app import console, models, storage
from raytune_app.config import Recipe
from raytune_app.train.arguments import (
    dpo_arguments,
    grpo_arguments,
    kto_arguments,
    orpo_arguments,
    simpo_arguments,
    training_arguments,
)

# Fault drill: with this variable set where the driver runs, the workers exit abruptly after that many
# optimizer steps, once per run directory (a marker file keeps restarted workers from failing again).
# Used by the resume tests; handy to rehearse recovery on a real cluster.
FAULT_ENV = "RAYTUNE_APP_FAULT_AT_STEP"


@dataclass(frozen=True)
class WorkerConfig:
    """What every Ray Train worker of a run gets, made once on the driver (train/run.py `build_trainer`).

    The recipe travels as the validated object it is (pickled to the workers, not re-validated there),
    with every path a worker reads already absolute: the workers do not know the recipe file's folder.
    """

    recipe: Recipe
    prepared_dir: str  # the prepared (or distilled) splits
    out_dir: str  # runs/<name>/train (or a tune trial's folder): weights, metrics, summary
    use_gpu: bool
    parent_adapter: str | None = None  # the adapter this run continues (a chain's previous step)
    fault_at_step: int | None = None  # FAULT_ENV: exit abruptly after this step (resume drills)
    recipe_dir: str | None = None  # the recipe file's folder: train.deepspeed.config_file is relative to it
    task_schema: dict | None = None  # the task's JSON Schema, for GRPO's json_schema reward


# Logged values worth a place on the progress line, when the method logs them.
# The preference methods' TRL trainers: (module, class, recipe -> arguments). No ref_model is passed: with
# LoRA, DPO and KTO score the reference with a frozen copy of the starting adapter (the base itself for a
# fresh adapter), so the base weights are held once; ORPO and SimPO (CPO's simpo loss) need no reference.
PAIR_TRAINERS = {
    "dpo": ("trl", "DPOTrainer", dpo_arguments),
    "orpo": ("trl.experimental.orpo", "ORPOTrainer", orpo_arguments),
    "simpo": ("trl.experimental.cpo", "CPOTrainer", simpo_arguments),
    "kto": ("trl", "KTOTrainer", kto_arguments),
}
PROGRESS_EXTRAS = (("rewards/margins", "margin"), ("rewards/accuracies", "pair acc"), ("reward", "reward"))


def load_splits(prepared_dir: str, rationale_weight: float = 1.0):
    """Train and validation splits as Hugging Face datasets, with only the columns the collator uses.

    Distilled data (a `task` column) gets a `loss_weight` per example: 1 for the label task,
    `rationale_weight` for the rationale task; with weight 0 the rationale rows are left out, which
    makes the run plain fine-tuning on the label task."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    from raytune_app.data.prepare import load_split

    manifest = json.loads(storage.read_text(storage.join(prepared_dir, "manifest.json")))

    def as_dataset(split: str) -> datasets.Dataset:
        table = load_split(prepared_dir, split)
        weighted = "task" in table.column_names and split == "train" and rationale_weight > 0
        if "task" in table.column_names and not weighted:
            table = table.filter(pc.equal(table["task"], "label"))
        # Labels are the tokens to learn: the assistant's (completion_mask 1); the rest is -100, ignored.
        labels = [
            [t if m else -100 for t, m in zip(ids, mask)]
            for ids, mask in zip(table["input_ids"].to_pylist(), table["completion_mask"].to_pylist())
        ]
        columns = {"input_ids": table["input_ids"], "labels": pa.array(labels, pa.list_(pa.int32()))}
        if "seq_lengths" in table.column_names:
            columns["seq_lengths"] = table["seq_lengths"]
        else:
            columns["length"] = table["num_tokens"]  # for length-grouped batching of unpacked data
        if weighted:
            columns["loss_weight"] = pa.array(
                [1.0 if t == "label" else rationale_weight for t in table["task"].to_pylist()], pa.float32()
            )
        # The prepare manifest already identifies the split's content; giving it as the fingerprint
        # spares datasets from hashing the whole table (slow, and noisy on the console).
        return datasets.Dataset(
            pa.table(columns), fingerprint=f"{manifest['fingerprint']}-{split}-labels-{rationale_weight}"
        )

    train = as_dataset("train")
    return train, as_dataset("val"), "seq_lengths" in train.column_names


def load_preference_splits(prepared_dir: str):
    """Train and validation preference pairs (prompt, chosen, rejected as chat messages) for DPOTrainer."""
    import datasets

    from raytune_app.data.prepare import load_split

    def as_dataset(split: str) -> datasets.Dataset:
        return datasets.Dataset(load_split(prepared_dir, split).select(["prompt", "chosen", "rejected"]))

    return as_dataset("train"), as_dataset("val")


def load_prompt_splits(prepared_dir: str, eval_prompts: int):
    """GRPO's prompts from prompt/response or chat data: every message before the last answer is the
    prompt; the answer becomes the `reference` column reward functions compare with."""
    import datasets

    from raytune_app.data.prepare import load_split

    def as_dataset(split: str, limit=None) -> datasets.Dataset:
        messages = load_split(prepared_dir, split).column("messages").to_pylist()[:limit]
        return datasets.Dataset.from_dict(
            {"prompt": [m[:-1] for m in messages], "reference": [m[-1]["content"] for m in messages]}
        )

    return as_dataset("train"), as_dataset("val", eval_prompts)


def _progress_callback():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A console line per log step (rank 0): step, loss, tokens/s, ETA; adds tokens/s and memory to the log."""

        def __init__(self):
            self.started: float | None = None
            self.last: tuple[float, int, int] = (time.time(), 0, 0)

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            self.last = (time.time(), state.num_input_tokens_seen or 0, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:
                return
            now, tokens = time.time(), state.num_input_tokens_seen or 0
            then, tokens_then, step_then = self.last
            self.last = (now, tokens, state.global_step)
            logs["tokens_per_second"] = round((tokens - tokens_then) / max(now - then, 1e-9), 1)
            logs["peak_memory_mb"] = round(_peak_memory_mb(), 1)
            # The trainer filed a copy of `logs` in its history before calling us; that history is what
            # checkpoints carry across a resume, so the additions go there too.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(
                    tokens_per_second=logs["tokens_per_second"], peak_memory_mb=logs["peak_memory_mb"]
                )
            if state.is_world_process_zero:
                steps_left = state.max_steps - state.global_step
                per_step = (now - then) / max(state.global_step - step_then, 1)
                # DPO's reward margin and GRPO's mean reward say more about progress than the loss does.
                extra = "".join(f"  {label} {logs[key]:.3f}" for key, label in PROGRESS_EXTRAS if key in logs)
                # One progress line (it updates in place on the driver's terminal: raytune_app/console.py).
                console.progress(
                    console.logger("train"),
                    state.global_step,
                    state.max_steps,
                    f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}{extra}  "
                    f"lr {logs.get('learning_rate', 0):.2e}  {logs['tokens_per_second']:.0f} tok/s  "
                    f"ETA {steps_left * per_step / 60:.1f} min",
                )

    return Progress()


def _fault_callback(marker: str, step: int):
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step and not storage.exists(marker):  # the marker may be on S3
                if state.is_world_process_zero:
                    storage.write_text(marker, f"fault injected after step {state.global_step}\n")
                time.sleep(1.0)  # let rank 0 write the marker before every rank goes down
                os._exit(17)

    return Fault()


def _at_last_step(checkpoint_dir: str) -> bool:
    """Whether a Trainer checkpoint is its run's last step (saved, then stopped before the final weights
    were written out: a killed driver, a lost node)."""
    state = json.load(open(os.path.join(checkpoint_dir, "trainer_state.json")))
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def _final_eval(trainer) -> dict:
    """The validation metrics of the final weights. The checkpoint cadence evaluates at every checkpoint step,
    so when the last step was one, the trainer already scored these very weights (nothing changes them after
    the last step: no best-checkpoint reload) and its log has the numbers; scoring the whole validation split
    again would only repeat them (on a CPU that second pass can take longer than a short run's training).
    Otherwise: one evaluation now."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") != step:
            break
        if any(key.startswith("eval_") for key in entry):
            return {key: value for key, value in entry.items() if key != "step"}
    return trainer.evaluate()


def _load_last_step(trainer, checkpoint_dir: str) -> None:
    """Take a checkpoint of the run's last step as it is: weights and trainer state (history, step,
    tokens seen). transformers' `train(resume_from_checkpoint=...)` would take one optimizer step past
    max_steps from there (its loop checks for the end only after a step), so a resumed run would not
    end with the weights an uninterrupted one has."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint_dir)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint_dir, "trainer_state.json"))


def _logging_dir(recipe: Recipe, out_dir: str, scratch_dir: str) -> str | None:
    """Where TensorBoard event files and the offline W&B run go (train.report_to): the run's train folder, or
    this attempt's scratch when that folder is remote (copied there when training ends)."""
    wanted = {"tensorboard", "wandb"} & set(recipe.train.report_to)
    if not wanted:
        return None
    local = out_dir if "://" not in out_dir else os.path.join(scratch_dir, "logs")
    if "wandb" in wanted:
        # W&B reads these when the trainer starts: offline unless the user chose a mode, one project per run.
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_PROJECT", recipe.run.name)
        os.environ["WANDB_DIR"] = local
        os.makedirs(local, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(local, "tensorboard")  # read by transformers' callback
    return os.environ["TENSORBOARD_LOGGING_DIR"]


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_worker(loop_config: dict) -> None:
    """Ray Train's `train_loop_per_worker` (its `train_loop_config` is {"worker": WorkerConfig}): one attempt
    of the run, in its own scratch folder (removed at the end)."""
    import ray
    import ray.train
    import ray.train.torch

    from raytune_app.train import scratch

    config: WorkerConfig = loop_config["worker"]
    device = ray.train.torch.get_device() if config.use_gpu else None
    leader = scratch.node_leader(ray.get_runtime_context().get_node_id())
    folder = scratch.start_attempt(config.out_dir, leader, device=device)
    try:
        _train(config, folder)
        scratch.barrier()  # every rank has saved its part of the final weights
    finally:
        scratch.end_attempt(folder, leader)


def _train(config: WorkerConfig, scratch_dir: str) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from transformers import set_seed
    from trl import SFTTrainer

    from raytune_app.distill.loss import KeepWeights, multitask_trainer
    from raytune_app.train.deepspeed import deepspeed_config
    from raytune_app.train.model import load_for_training
    from raytune_app.train.settings import DeepSpeedSection

    recipe = config.recipe
    if not config.use_gpu:
        # DeepSpeed picks its accelerator at import; on a CPU worker it must not probe for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    use_gpu = config.use_gpu
    set_seed(recipe.run.seed)

    tokenizer = models.load_tokenizer(
        recipe.model.path, recipe.model.tokenizer, recipe.model.chat_template, recipe.model.trust_remote_code
    )
    device = ray.train.torch.get_device()
    model = load_for_training(recipe.model, recipe.train, device, parent_adapter=config.parent_adapter)
    ds_config = (
        deepspeed_config(recipe.train.deepspeed or DeepSpeedSection(), use_gpu, config.recipe_dir)
        if recipe.train.uses_deepspeed
        else None
    )
    from raytune_app.train.scratch import CHECKPOINT_NAME, report_callback

    callbacks = [report_callback(), _progress_callback()]
    if config.fault_at_step:
        callbacks.append(_fault_callback(storage.join(config.out_dir, "fault-injected"), config.fault_at_step))
    if recipe.train.profile_steps and rank == 0:
        from raytune_app.train.profile import profile_callback

        target = storage.join(config.out_dir, "profile.txt")
        callbacks.append(profile_callback(recipe.train.profile_steps, recipe.train.logging_steps, target))
    logs = _logging_dir(recipe, config.out_dir, scratch_dir)
    method, packed = recipe.train.method, False
    if method == "sft":
        train_set, val_set, packed = load_splits(config.prepared_dir, recipe.train.distill.rationale_weight)
        args = training_arguments(recipe, scratch_dir, use_gpu, packed=packed, ds_config=ds_config)
        multitask = "loss_weight" in train_set.column_names  # distilled data: label + weighted rationale tasks
        trainer_class = multitask_trainer(SFTTrainer) if multitask else SFTTrainer
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if multitask:
            trainer.data_collator = KeepWeights(trainer.data_collator)
    elif method in PAIR_TRAINERS:
        trainer_module, trainer_name, arguments = PAIR_TRAINERS[method]
        trainer_class = getattr(importlib.import_module(trainer_module), trainer_name)
        train_set, val_set = load_preference_splits(config.prepared_dir)
        if method == "kto":
            from trl.data_utils import unpair_preference_dataset

            # KTO judges each answer alone: every pair becomes a desirable and an undesirable example.
            train_set, val_set = unpair_preference_dataset(train_set), unpair_preference_dataset(val_set)
        trainer = trainer_class(
            model=model,
            args=arguments(recipe, scratch_dir, use_gpu, ds_config),
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    elif method == "grpo":
        import jsonschema
        from trl import GRPOTrainer

        from raytune_app.train import rewards

        schema = config.task_schema
        validator = jsonschema.validators.validator_for(schema)(schema) if schema else None
        reward_funcs, weights = rewards.build(recipe.train.grpo.rewards, validator)
        train_set, val_set = load_prompt_splits(config.prepared_dir, recipe.train.grpo.eval_prompts)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=grpo_arguments(recipe, scratch_dir, use_gpu, ds_config, weights),
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    else:
        raise ValueError(f"unknown train.method {method!r}")
    # Our progress line replaces the trainer's raw dict printout (its console logger without tqdm).
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)

    resume_from, resumed_step = None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restored = checkpoint.to_directory(os.path.join(scratch_dir, "restored"))
        resume_from = os.path.join(restored, CHECKPOINT_NAME)
        resumed_step = json.load(open(os.path.join(resume_from, "trainer_state.json")))["global_step"]
        if rank == 0:
            console.logger("train").info(f"resuming from step {resumed_step} ({checkpoint.path})")
    if resume_from is not None and method == "sft" and not ds_config and _at_last_step(resume_from):
        _load_last_step(trainer, resume_from)
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    final_eval = _final_eval(trainer)

    # DPO / GRPO added a frozen "ref" adapter to score the reference; the saved adapter is the trained one alone.
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")
    # Where the workers of the attempt that finished ran (by world rank), for the manifest: on a cluster,
    # which nodes trained (and, after a lost node, where Ray Train restarted them). Every rank takes part.
    from raytune_app.train.scratch import all_gather

    nodes = all_gather(ray.get_runtime_context().get_node_id())
    # Rank 0 writes the final artefacts; with ZeRO-3 every rank takes part in gathering the weights.
    with tempfile.TemporaryDirectory() as staging:
        trainer.save_model(staging)
        if rank == 0:
            tokenizer.save_pretrained(staging)
            target = storage.join(config.out_dir, "adapter" if recipe.train.finetuning != "full" else "model")
            storage.upload_dir(staging, target)
            history = [dict(entry) for entry in trainer.state.log_history]
            summary = {
                "global_step": trainer.state.global_step,
                "final_eval": final_eval,
                "tokens_seen": trainer.state.num_input_tokens_seen,
                "packed": packed,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "worker_nodes": nodes,
                "resumed_from_step": resumed_step,
            }
            storage.write_text(
                storage.join(config.out_dir, "metrics.jsonl"), "".join(json.dumps(entry) + "\n" for entry in history)
            )
            storage.write_text(storage.join(config.out_dir, "worker_summary.json"), json.dumps(summary, indent=2))
            if logs is not None and "://" in config.out_dir:  # a remote run folder: the logs were local scratch
                storage.upload_dir(os.path.dirname(logs), storage.join(config.out_dir, "logs"))
