"""The train stage's driver: checks, a Ray Train TorchTrainer over `worker.train_worker`, outputs.

    raytune-app train --recipe recipes/quickstart.yaml [--resume | --restart]

Layout of `runs/<name>/train/`:
    run.json              fingerprint of this training run (recipe sections + prepared data), written first
    checkpoint_*/         Ray Train checkpoints (best K by validation loss, plus the latest)
    adapter/ or model/    the final weights and tokenizer
    recipe.yaml           the resolved recipe
    metrics.jsonl         train/val loss, learning rate, tokens/s, peak memory per logged step
    loss_curve.png, manifest.json (written last: the run is complete)

A run whose fingerprint matches a finished one is not repeated. An interrupted run with the same
fingerprint continues from its latest checkpoint; one whose recipe or data changed is moved aside
(`train.previous-<fingerprint>/`), never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

from raytune_app import config as recipe_config
from raytune_app import console, integrity, outcomes, resources, runstate, shared_dir, storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError
from raytune_app.train.manifest import TrainManifest
from raytune_app.train.settings import PREFERENCE_METHODS


class TrainError(DataError):
    """A training run that cannot start; the message says why and what to do."""


# run.json is written before the workers start, manifest.json once the weights are saved (runstate.py).
RUN_RECORDS = runstate.RunRecords(started="run.json", finished="manifest.json", noun="run", start_hint="start training")


def fingerprint(recipe: Recipe, prepare_manifest: dict, parent: TrainManifest | None = None) -> str:
    """Identifies a training run: what it trains from (model, parent adapter's run, data) and how."""
    # train.distill matters only when training on distilled data; leaving it out otherwise keeps the
    # fingerprints of runs made before that setting existed.
    # The same holds for the settings of the methods not in use (dpo, grpo).
    # And where metrics are reported (report_to) or which nodes the workers use (worker_resources) changes
    # no weights.
    methods = {"dpo", "orpo", "simpo", "kto", "grpo"}
    exclude = (
        ({"distill"} if "distill" not in recipe.run.stages else set())
        | (methods - {recipe.train.method})
        | {"report_to", "worker_resources"}
    )
    payload = {
        "model": recipe.model.model_dump(mode="json"),
        "train": recipe.train.model_dump(mode="json", exclude=exclude),
        "seed": recipe.run.seed,
        "data": prepare_manifest["fingerprint"],
        "parent": parent["fingerprint"] if parent else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _examples_used(recipe: Recipe, prepared: dict) -> int:
    """Training rows the workers will read: distilled data at rationale weight 0 is its label rows alone."""
    if prepared.get("stage") == "distill" and recipe.train.distill.rationale_weight == 0:
        return prepared["tasks"].get("label", 0)
    return prepared["rows_out"]["train"]


def check_resources(recipe: Recipe) -> tuple[bool, float]:
    """(use_gpu, CPUs per worker) for this cluster (raytune_app/resources.py), or TrainError when the
    workers can never fit."""
    import ray

    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    plan = resources.plan_workers(recipe.train, int(total.get("GPU", 0)), int(total.get("CPU", 0)), nodes=nodes)
    if plan.problems:
        raise TrainError("; ".join(plan.problems))
    return plan.use_gpu, plan.cpus_per_worker


# The validation number that ranks checkpoints (Ray Train keeps the best K): the loss for SFT and DPO,
# the mean reward of sampled answers for GRPO (its loss is not a measure of quality).
CHECKPOINT_SCORE = {
    "sft": ("eval_loss", "min"),
    "dpo": ("eval_loss", "min"),
    "orpo": ("eval_loss", "min"),
    "simpo": ("eval_loss", "min"),
    "kto": ("eval_loss", "min"),
    "grpo": ("eval_reward", "max"),
}


def _worker_recipe(recipe: Recipe) -> Recipe:
    """The recipe for the workers, with the paths they read made absolute (they do not know the recipe
    file's folder): a copy; the recipe itself is left as it is."""
    copy = recipe.model_copy(deep=True)
    for spec in copy.train.grpo.rewards:
        if "schema_file" in spec.args:
            spec.args["schema_file"] = storage.absolute(recipe.resolve_source(spec.args["schema_file"]))
    copy.source_path = recipe.source_path
    return copy


def _task_schema(recipe: Recipe) -> dict | None:
    """The task's JSON Schema (evaluate.schema_file or the data generator's), for the json_schema reward."""
    from raytune_app.evaluate.run import load_schema

    validator = load_schema(recipe)
    return validator.schema if validator is not None else None


def _loss_curve(history: list[dict], target: str) -> None:
    # A bare Figure, not pyplot: pyplot keeps global state, and training runs may end side by side in
    # one driver (Tune trials, concurrent runs).
    from matplotlib.figure import Figure

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    # GRPO's loss says little about quality; its rewards (train and validation) go on a second axis.
    rewards = [(h["step"], h["reward"]) for h in history if "reward" in h]
    val_rewards = [(h["step"], h["eval_reward"]) for h in history if "eval_reward" in h]
    if rewards or val_rewards:
        twin = ax.twinx()
        if rewards:
            twin.plot(*zip(*rewards), color="tab:green", label="mean reward")
        if val_rewards:
            twin.plot(*zip(*val_rewards), color="tab:red", marker="o", label="validation reward")
        twin.set_ylabel("reward")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    storage.write_bytes(target, buffer.getvalue())


def _log_to_mlflow(recipe: Recipe, manifest: TrainManifest) -> str | None:
    """Track the finished run in MLflow. A tracking store that cannot be reached must not cost the
    trained weights: the failure is reported and the register stage logs the run later."""
    from raytune_app.registry import store

    try:
        run_id = store.log_train_run(recipe, manifest)
    except Exception as exc:  # any store or network failure; the weights are already saved
        console.logger("train").warning(
            f"could not log the run to MLflow ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "`raytune-app run` or the register stage will log it later"
        )
        return None
    console.logger("train").info(f"tracked in MLflow: run {run_id} at {store.tracking_uri(recipe)}")
    return run_id


def build_trainer(
    recipe: Recipe,
    *,
    out_dir: str,
    prepared_dir: str,
    use_gpu: bool,
    cpus_per_worker: float,
    parent_adapter: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
):
    """The TorchTrainer of one training run: its workers run `worker.train_worker` and write the
    weights and history into `out_dir`; Ray Train keeps checkpoints in <storage_path>/train (default:
    the run directory), where a later fit with the same storage resumes from. The train stage fits it
    as is; each Ray Tune trial fits one with `callbacks=[TuneReportCallback()]` (raytune_app/tune/run.py).
    The workers' scratch folders are keyed by `out_dir` (raytune_app/train/scratch.py), so runs and trials
    with their own output folders never share one."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytune_app.train.worker import FAULT_ENV, WorkerConfig, train_worker

    method = recipe.train.method
    train_cfg = recipe.train
    score, order = CHECKPOINT_SCORE[method]
    # A remote storage path goes to Ray with its filesystem (endpoint, region from the AWS_* variables).
    ray_path, ray_fs = storage.ray_storage(storage_path or storage.absolute(recipe.run_dir))
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "worker": WorkerConfig(
                recipe=_worker_recipe(recipe),
                prepared_dir=prepared_dir,
                out_dir=out_dir,
                use_gpu=use_gpu,
                parent_adapter=parent_adapter,
                fault_at_step=int(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None,
                recipe_dir=str(Path(recipe.source_path).parent) if recipe.source_path else None,
                task_schema=_task_schema(recipe) if method == "grpo" else None,
            )
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.workers,
            use_gpu=use_gpu,
            # Custom resources (train.worker_resources) pin the workers to the nodes that declare them.
            resources_per_worker=(({} if use_gpu else {"CPU": cpus_per_worker}) | dict(train_cfg.worker_resources))
            or None,
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train_cfg.checkpoint.keep_best,
                checkpoint_score_attribute=score,
                checkpoint_score_order=order,
            ),
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            callbacks=callbacks,
        ),
    )


def write_manifest(
    recipe: Recipe,
    out_dir: str,
    result,
    *,
    fingerprint: str,
    prepared: dict,
    parent: TrainManifest | None,
    use_gpu: bool,
    began: float,
) -> TrainManifest:
    """After a fit: the loss curve and `manifest.json` in `out_dir` (which marks the run finished)."""
    train_cfg = recipe.train
    current, parent_adapter = fingerprint, (parent["weights"] if parent else None)
    summary = storage.read_json(storage.join(out_dir, "worker_summary.json"))
    history = [json.loads(line) for line in storage.read_text(storage.join(out_dir, "metrics.jsonl")).splitlines()]
    _loss_curve(history, storage.join(out_dir, "loss_curve.png"))
    best = result.best_checkpoints[0] if result.best_checkpoints else None
    manifest = TrainManifest(
        **{
            "stage": "train",
            "fingerprint": current,
            "method": train_cfg.method,
            "finetuning": train_cfg.finetuning,
            "base_model": recipe.model.path,
            "data_fingerprint": prepared["fingerprint"],
            "recipe_hash": recipe.section_hash("model", "train"),
            "parent_adapter": parent_adapter,
            "parent_fingerprint": parent["fingerprint"] if parent else None,
            "global_step": summary["global_step"],
            "final_eval_loss": summary["final_eval"].get("eval_loss"),
            # What the method itself optimises, on the validation split: DPO's reward margin and pair
            # accuracy (policy vs reference), GRPO's mean reward.
            "final_eval": {
                key: value
                for key, value in summary["final_eval"].items()
                if key.startswith(("eval_rewards/", "eval_reward"))
            },
            "tokens_seen": summary["tokens_seen"],
            "trainable_parameters": summary["trainable_parameters"],
            "weights": storage.join(out_dir, "adapter" if train_cfg.finetuning != "full" else "model"),
            "best_checkpoint": best[0].path if best else None,
            "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
            "seconds_this_session": round(time.time() - began, 1),
            "workers": train_cfg.workers,
            "use_gpu": use_gpu,
            "worker_nodes": summary.get("worker_nodes", []),
            "resumed_from_step": summary.get("resumed_from_step"),
        }
    )
    # The manifest marks the run finished before MLflow is contacted (a store that hangs or fails must
    # not make a finished run look unfinished); it is written again with the MLflow run id.
    manifest.write(storage.join(out_dir, "manifest.json"))
    storage.remove(storage.join(out_dir, "worker_summary.json"))
    return manifest


# Optional packages a recipe may ask for: (recipe setting, module, pip name, why).
OPTIONAL_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "'raytune-app[logging]'"),
    "wandb": (("wandb",), "'raytune-app[logging]'"),
    "liger": (("liger_kernel",), "liger-kernel"),
    "flash_attention_2": (("flash_attn",), "flash-attn --no-build-isolation"),
    "flash_attention_3": (("flash_attn_interface",), "flash-attn 3 (hopper/ in the flash-attention repository)"),
    "8bit": (("bitsandbytes",), "bitsandbytes"),
}


def check_packages(recipe: Recipe, use_gpu: bool) -> None:
    """TrainError, before any worker starts, for a setting whose package is missing here (logging targets,
    kernels, 8-bit optimizers). GPU-only kernels on CPU workers are refused by check_resources first."""
    import importlib.util

    train = recipe.train
    wanted: list[str] = [t for t in train.report_to if t != "mlflow"]
    wanted += ["liger"] if train.liger else []
    wanted += [train.attn_implementation] if train.attn_implementation.startswith("flash") else []
    wanted += ["8bit"] if train.optimizer != "adamw_torch" else []
    for setting in wanted:
        modules, install = OPTIONAL_PACKAGES[setting]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise TrainError(f"train setting {setting} needs the {modules[0]} package here: pip install {install}")


def training_data(recipe: Recipe) -> tuple[str, dict]:
    """(folder, manifest) of the data a training run reads: the distilled data when the recipe distils,
    else the prepared splits; TrainError when it is missing or the method cannot train on it."""
    from raytune_app.data.prepare import NotPrepared, current_manifest
    from raytune_app.distill import run as distill_run

    # With a distill stage the student learns from the distilled data (label + rationale tasks).
    source = "distill" if distill_run.distilled(recipe) else "prepare"
    try:
        prepared = distill_run.current_manifest(recipe) if source == "distill" else current_manifest(recipe)
    except NotPrepared as exc:
        raise TrainError(str(exc)) from None
    # The complete version the manifest came from (on an object store: the one its pointer names).
    prepared_dir = storage.current(storage.absolute(recipe.stage_dir(source)))
    method = recipe.train.method
    if (prepared["kind"] == "preference") != (method in PREFERENCE_METHODS):
        raise TrainError(
            f"train.method {method} cannot train on the prepared data ({prepared['kind']}): "
            f"{', '.join(PREFERENCE_METHODS)} train on preference pairs, sft and grpo on prompt_response or chat "
            "data; re-run prepare after changing data.kind"
        )
    if prepared["rows_out"]["train"] == 0 or prepared["rows_out"]["val"] == 0:
        raise TrainError(
            f"the prepared data has {prepared['rows_out']['train']} train and {prepared['rows_out']['val']} "
            "validation examples; training needs both (check data.split and rejected.jsonl)"
        )
    return prepared_dir, prepared


def train(
    recipe: Recipe, resume: bool = False, restart: bool = False, parent: TrainManifest | None = None
) -> TrainManifest:
    """Run the train stage; returns its manifest. `parent`: the manifest of the run whose adapter this
    one continues (a previous chain step)."""
    # First: on a cluster whose nodes do not share the run directory, nothing below can work (rank 0 writes
    # checkpoints and weights on its node that the driver and restarted workers read on theirs).
    shared_dir.check(recipe.run_dir)
    prepared_dir, prepared = training_data(recipe)
    use_gpu, cpus_per_worker = check_resources(recipe)  # before anything is written
    check_packages(recipe, use_gpu)
    out_dir = storage.absolute(recipe.stage_dir("train"))
    log = console.logger("train")
    current = fingerprint(recipe, prepared, parent)
    parent_adapter = parent["weights"] if parent else None
    state = runstate.decide(
        out_dir,
        current,
        RUN_RECORDS,
        resume=resume,
        restart=restart,
        error=TrainError,
        log=log.info,
        damaged=lambda finished: integrity.weights_problem(finished["weights"]),
        unresumable=lambda: integrity.resume_problem(out_dir),
    )
    outcomes.note(outcomes.label(recipe, "train"), state.how, state.why)
    if state.finished is not None:
        log.info(
            f"already finished at step {state.finished['global_step']} with this recipe and data; nothing to do "
            f"({out_dir})"
        )
        return TrainManifest.model_validate(state.finished)
    if state.resuming:
        log.info(f"continuing the interrupted run in {out_dir}")
    recipe_config.save_resolved(recipe, out_dir)

    trainer = build_trainer(
        recipe,
        out_dir=out_dir,
        prepared_dir=prepared_dir,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        parent_adapter=parent_adapter,
    )
    log.info(
        f"{recipe.train.workers} worker(s), {'GPU' if use_gpu else f'{cpus_per_worker} CPU each'}; "
        f"{recipe.train.finetuning} on {recipe.model.path}; {_examples_used(recipe, prepared)} train examples"
    )
    began = time.time()
    result = trainer.fit()
    # A worker that died (its node lost, killed) left its attempt's scratch on its node, and the group Ray
    # Train restarted may have gone elsewhere, so no later attempt there removes it.
    from raytune_app.train import scratch

    scratch.remove_on_every_node([out_dir])
    manifest = write_manifest(
        recipe, out_dir, result, fingerprint=current, prepared=prepared, parent=parent, use_gpu=use_gpu, began=began
    )
    manifest.mlflow_run_id = _log_to_mlflow(recipe, manifest)
    manifest.write(storage.join(out_dir, "manifest.json"))
    measured = {
        "validation loss": manifest["final_eval_loss"],
        "reward margin": manifest["final_eval"].get("eval_rewards/margins"),
        "mean reward": manifest["final_eval"].get("eval_reward"),
    }
    log.info(
        f"done: step {manifest['global_step']}, "
        + ", ".join(f"{name} {value:.4f}" for name, value in measured.items() if value is not None)
        + f"; weights in {manifest['weights']}"
    )
    return manifest


def train_chain(recipe: Recipe, resume: bool = False, restart: bool = False) -> TrainManifest:
    """Multi-stage training: each `chain` step prepares its own data and trains from the previous
    step's adapter. Returns the last step's manifest with the lineage of every step under `chain`."""
    from raytune_app.data.prepare import prepare

    parent: TrainManifest | None = None
    steps: list[dict] = []
    for index, step in enumerate(recipe.chain):
        step_recipe = recipe.chain_step(index)
        console.logger("train").info(
            f"chain step {index + 1}/{len(recipe.chain)}: {step.name}"
            + (f" (from {parent['weights']})" if parent else f" (from {recipe.model.path})")
        )
        if step.pairs is not None:  # this step learns from the previous step's mistakes
            from raytune_app.train.pairs import build_pairs

            assert parent is not None, "a chain's first step has no `pairs` (checked with the recipe)"
            build_pairs(
                recipe.chain_step(index - 1),
                parent["weights"],
                parent["fingerprint"],
                step.pairs,
                recipe.pairs_dir(index),
            )
        prepare(step_recipe)
        parent = train(step_recipe, resume=resume, restart=restart, parent=parent)
        steps.append(
            {
                "step": step.name,
                "fingerprint": parent["fingerprint"],
                "weights": parent["weights"],
                "parent_fingerprint": parent["parent_fingerprint"],
                "final_eval_loss": parent["final_eval_loss"],
                "global_step": parent["global_step"],
            }
        )
    assert parent is not None, "a chain has at least one step (checked with the recipe)"
    lineage = {"stage": "train", "chain": steps, "weights": parent["weights"], "fingerprint": parent["fingerprint"]}
    storage.write_text(
        storage.join(storage.absolute(recipe.run_dir), "chain.json"), json.dumps(lineage, indent=2) + "\n"
    )
    return parent.model_copy(update={"chain": steps})
