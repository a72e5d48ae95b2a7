"""The tune stage's driver: a Ray Tune search whose trials are full Ray Train runs of the train stage.

    raytune-app tune --recipe recipes/tune_quickstart.yaml [--resume | --restart]

Each trial is a function (`run_trial`) that applies one sampled point of `tune.search_space` to the
recipe's `train` section and fits the train stage's own TorchTrainer (train/run.py `build_trainer`)
with Ray's TuneReportCallback: every checkpoint (train.checkpoint.every_steps) reports the validation
metrics to Tune, where ASHA compares trials in optimizer steps and stops the ones behind. A trial is
`train.workers` workers (one GPU each, or `tune.cpus_per_worker` CPUs); as many run at once as the
cluster fits, and a trial that can never fit fails the stage before any trial starts.

Layout of `runs/<name>/tune/`:
    search.json           fingerprint of this search (recipe sections + prepared data), written first
    search/               Ray Tune's experiment (state, searcher, per-trial results): what Tuner.restore reads
    trials/<trial id>/    one Ray Train run per trial: train/ checkpoints, recipe.yaml, attempts.jsonl,
                          and for trials that ran to the end adapter/, metrics.jsonl, loss_curve.png, manifest.json
    trials.md, trials.json, tune_plot.png, best_recipe.yaml
    summary.json          written last: the search is complete

Resuming: an interrupted search (Ctrl-C, a lost driver) with the same fingerprint continues when the
stage runs again (`--resume` insists on it): Tuner.restore keeps every finished trial, and the trials
that were running start again from their latest Ray Train checkpoint. A finished search is not
repeated; one whose recipe or data changed is moved aside (`tune.previous-<fingerprint>-<time>/`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time

from raytune_app import config as recipe_config
from raytune_app import console, outcomes, resources, runstate, shared_dir, storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError
from raytune_app.train import scratch
from raytune_app.tune.cleanup import release_orphaned_placement_groups
from raytune_app.tune.settings import ParamSpec, typed_space
from raytune_app.tune.trials import trial_recipe

# Fault drill: with this variable set to N, the driver interrupts itself (SIGINT, as Ctrl-C does)
# once N trials have ended in this session. Used by the resume test; handy to rehearse a restore.
INTERRUPT_ENV = "RAYTUNE_APP_TUNE_INTERRUPT_AFTER"

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes reserved for each trial's driver function (it holds no model)


class TuneError(DataError):
    """A search that cannot start; the message says why and what to do."""


# search.json is written before any trial starts, summary.json once the results are (runstate.py).
SEARCH_RECORDS = runstate.RunRecords(
    started="search.json",
    finished="summary.json",
    noun="search",
    start_hint="start the search",
    finished_on_resume="refuse",
)


def fingerprint(recipe: Recipe, prepared: dict) -> str:
    """Identifies a search: what its trials train from and how, and how the search runs."""
    payload = {
        "model": recipe.model.model_dump(mode="json"),
        "train": recipe.train.model_dump(mode="json", exclude={"worker_resources"}),  # placement only
        "tune": recipe.tune.model_dump(mode="json", exclude={"register_best"}),
        "seed": recipe.run.seed,
        "data": prepared["fingerprint"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def plan_resources(recipe: Recipe) -> dict:
    """Per-trial resources (raytune_app/resources.py) and how many trials run at once on this cluster;
    TuneError when a single trial can never fit."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), float(total.get("CPU", 0))
    workers, per_worker = recipe.train.workers, recipe.tune.cpus_per_worker
    plan = resources.plan_workers(recipe.train, gpus, cpus, cpus_per_worker=per_worker)
    if plan.problems:
        raise TuneError(f"one trial can never start: {'; '.join(plan.problems)}")
    # Workers fit node by node (a worker never spans nodes): three 3-CPU nodes hold four 2-CPU workers'
    # worth of cores but only three such workers.
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    # Custom resources no node declares yet (an autoscaler may add such nodes): counted by CPUs alone.
    extra = recipe.train.worker_resources
    fits = resources.worker_slots(nodes, per_worker, extra) // workers
    if fits == 0 and extra and not resources.worker_slots(nodes, 0, extra):
        fits = resources.worker_slots(nodes, per_worker, {}) // workers
    if fits == 0:
        largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
        raise TuneError(
            f"one trial can never start: its {workers} worker(s) of tune.cpus_per_worker={per_worker:g} CPUs "
            f"each must each fit on one node, and the nodes (largest: {largest:g} CPUs) hold fewer; lower "
            "tune.cpus_per_worker or train.workers"
        )
    if plan.use_gpu:
        fits = min(fits, gpus // workers)
    wanted = recipe.tune.max_concurrent_trials
    concurrent = fits if wanted == "auto" else min(wanted, fits)
    return {
        "use_gpu": plan.use_gpu,
        "cpus_per_worker": per_worker,
        "concurrent": concurrent,
        "fits": fits,
        "per_trial": f"{workers} worker(s) x {'1 GPU + ' if plan.use_gpu else ''}{per_worker:g} CPU",
    }


def param_space(space: dict[str, ParamSpec], algorithm: str) -> dict:
    """The search space as Ray Tune domains, keyed by field path."""
    from ray import tune

    out = {}
    for path, spec in space.items():
        # ParamSpec's validator guarantees the field its `kind` names is set.
        if spec.kind == "choice" and spec.choice is not None:
            out[path] = tune.grid_search(list(spec.choice)) if algorithm == "grid" else tune.choice(list(spec.choice))
        elif spec.kind == "uniform" and spec.uniform is not None:
            out[path] = tune.uniform(*spec.uniform)
        elif spec.kind == "loguniform" and spec.loguniform is not None:
            out[path] = tune.loguniform(*spec.loguniform)
        elif spec.randint is not None:
            low, high = spec.randint
            out[path] = tune.randint(low, high + 1)  # Ray's upper bound is exclusive; the recipe's is not
    return out


def _report_callback(last_step: int):
    """Ray's TuneReportCallback, holding back the report of the last step: on that report Tune may end
    the trial (ASHA stops whatever reaches max_t), which would kill it before its weights and manifest
    are written. `run_trial` reports the last step itself once they are."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportUntilLast(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and (metrics[0].get("step") or 0) >= last_step:
                return
            super().after_report(run_context, metrics, checkpoint)

    return ReportUntilLast()


def run_trial(sample: dict, context: dict) -> None:
    """One Tune trial: the train stage's TorchTrainer on the sampled recipe, reporting to Tune at every
    checkpoint. Runs in a Tune trial actor; the Train workers it starts take the trial's resources."""
    import ray.tune

    from raytune_app.train.run import build_trainer, write_manifest
    from raytune_app.train.run import fingerprint as train_fingerprint

    trial_id = ray.tune.get_context().get_trial_id()
    recipe = trial_recipe(context["recipe"], sample, context["source_path"])
    out_dir = storage.join(context["trials_dir"], trial_id)
    current = train_fingerprint(recipe, context["prepared"])
    attempts = storage.join(out_dir, "attempts.jsonl")
    earlier = storage.read_text(attempts) if storage.exists(attempts) else ""
    # One line per start of this trial: a restored search restarts only the trials that had not ended.
    storage.write_text(attempts, earlier + json.dumps({"started": time.time(), "fingerprint": current}) + "\n")
    if not earlier:
        recipe_config.save_resolved(recipe, out_dir)
    trainer = build_trainer(
        recipe,
        out_dir=out_dir,
        prepared_dir=context["prepared_dir"],
        use_gpu=context["use_gpu"],
        cpus_per_worker=context["cpus_per_worker"],
        storage_path=out_dir,
        callbacks=[_report_callback(recipe.train.max_steps or 0)],  # set: the tune section requires it
    )
    began = time.time()
    result = trainer.fit()
    write_manifest(
        recipe,
        out_dir,
        result,
        fingerprint=current,
        prepared=context["prepared"],
        parent=None,
        use_gpu=context["use_gpu"],
        began=began,
    )
    ray.tune.report({key: value for key, value in result.metrics.items() if isinstance(value, (int, float, str))})


def _progress_callback(recipe: Recipe, space: dict, total: int, ended_file: str):
    """A Tune callback: a console line per started, finished, stopped and failed trial; each trial that
    ends is recorded in `ended_file` (an interrupted search is one where fewer than all have ended:
    Tune marks the trials it cut off at Ctrl-C terminated too). A restored Tuner brings back the
    callback it was built with (pickled with the experiment), so it keeps nothing in memory that a
    later session needs."""
    from ray import tune

    metric, max_steps = recipe.tune.metric, recipe.train.max_steps

    class Progress(tune.Callback):
        def __init__(self):
            self.ended = 0

        def _settings(self, trial) -> str:
            return ", ".join(f"{path.removeprefix('train.')}={_short(trial.config.get(path))}" for path in space)

        def on_step_end(self, iteration, trials, **info):
            release_orphaned_placement_groups(min_interval_s=2.0)

        def on_trial_start(self, iteration, trials, trial, **info):
            console.logger("tune").info(f"trial {trial.trial_id} started: {self._settings(trial)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            step, value = result.get("step"), result.get(metric)
            how = "ran to the end" if step is not None and step >= max_steps else "stopped early by ASHA"
            self.ended += 1
            _record_end(ended_file, trial.trial_id, "completed" if how == "ran to the end" else "stopped")
            console.logger("tune").info(
                f"trial {trial.trial_id} {how} at step {step}/{max_steps}: {metric} {_short(value)}, "
                f"{result.get('time_total_s', 0):.0f} s ({self._settings(trial)}) "
                f"[{self.ended} ended this session, {total} in all]"
            )
            self._maybe_interrupt()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended += 1
            _record_end(ended_file, trial.trial_id, "failed")
            console.logger("tune").info(
                f"trial {trial.trial_id} failed ({self._settings(trial)}); its error is in "
                f"{trial.path or 'the trial folder'}"
            )
            self._maybe_interrupt()

        def _maybe_interrupt(self):
            interrupt_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)  # read now: this may be a restored copy
            if interrupt_after and self.ended == interrupt_after:
                console.logger("tune").info(
                    f"{INTERRUPT_ENV}={interrupt_after}: interrupting the search (as Ctrl-C does)"
                )
                os.kill(os.getpid(), signal.SIGINT)

    return Progress()


def _record_end(ended_file: str, trial_id: str, how: str) -> None:
    ended = storage.read_json(ended_file) or {}
    ended[trial_id] = how
    storage.write_text(ended_file, json.dumps(ended))


def _started_trials(trials_dir: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(trials_dir)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [info.base_name for info in found if info.type == pafs.FileType.Directory]


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _search_algorithm(recipe: Recipe, concurrent: int):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    seed = recipe.tune.seed if recipe.tune.seed is not None else recipe.run.seed
    if recipe.tune.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent)
    # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: it takes the limit itself.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)


def _scheduler(recipe: Recipe):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    stopping = recipe.tune.early_stopping
    if not stopping.asha:
        return FIFOScheduler()
    # Time is counted in optimizer steps (reported with every checkpoint), not in reports: a trial
    # restarted from a checkpoint keeps its place.
    return ASHAScheduler(
        time_attr="step",
        max_t=recipe.train.max_steps,
        reduction_factor=stopping.reduction_factor,
        grace_period=stopping.grace_period or recipe.train.checkpoint.every_steps,
        brackets=1,
    )


def tune(recipe: Recipe, resume: bool = False, restart: bool = False) -> dict:
    """Run the tune stage; returns its summary (best trial, where the best recipe and adapter are)."""
    from ray import tune as ray_tune

    from raytune_app.train.run import TrainError, check_packages, training_data
    from raytune_app.tune import report

    log = console.logger("tune")
    if not recipe.tune.search_space:
        raise TuneError(
            "tune.search_space is empty: name the train fields to search (see recipes/tune_quickstart.yaml)"
        )
    if recipe.train.method != "sft":
        raise TuneError(f"train.method {recipe.train.method}: the tune stage searches sft runs so far")
    # Trials on any node write checkpoints there and resume from them on another: first, that every node sees it.
    shared_dir.check(recipe.run_dir)
    try:
        prepared_dir, prepared = training_data(recipe)
    except TrainError as exc:
        raise TuneError(str(exc)) from None
    space = typed_space(recipe.tune, recipe.train)
    plan = plan_resources(recipe)  # before anything is written
    try:
        check_packages(recipe, plan["use_gpu"])
    except TrainError as exc:
        raise TuneError(str(exc)) from None
    out_dir = storage.absolute(recipe.stage_dir("tune"))
    current = fingerprint(recipe, prepared)
    state = runstate.decide(
        out_dir, current, SEARCH_RECORDS, resume=resume, restart=restart, error=TuneError, log=log.info
    )
    finished, restoring = state.finished, state.resuming
    if finished is not None:
        log.info(
            f"already finished with this recipe and data; nothing to do. Best: {finished['best']['trial_id']} "
            f"({recipe.tune.metric} {finished['best']['final_metric']:.4f}); recipe {finished['best_recipe']}"
        )
        outcomes.note("tune", outcomes.REUSED)
        return finished

    total = recipe.tune.num_samples * (
        math.prod(len(s.choice or ()) for s in space.values()) if recipe.tune.algorithm == "grid" else 1
    )
    context = {
        "recipe": recipe.resolved(),
        "source_path": recipe.source_path,
        "prepared": prepared,
        "prepared_dir": prepared_dir,
        "trials_dir": storage.join(out_dir, "trials"),
        "use_gpu": plan["use_gpu"],
        "cpus_per_worker": plan["cpus_per_worker"],
    }
    # The trial function only waits on its Train workers, which hold the trial's CPUs / GPUs; it takes
    # no CPU itself (else two 1-CPU trials could not run on 2 cores), so max_concurrent_trials decides
    # how many run. Tune needs some resource in a trial's request: a little memory, which it does use.
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, context=context), {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    )
    ended_file = storage.join(out_dir, "ended.json")
    progress = _progress_callback(recipe, space, total, ended_file)
    experiment = storage.join(out_dir, "search")
    # A remote run directory goes to Ray as a path and its filesystem (endpoint, region: AWS_* variables).
    search_path, search_fs = storage.ray_storage(experiment)
    restoring = restoring and ray_tune.Tuner.can_restore(search_path, storage_filesystem=search_fs)
    if restoring:
        log.info(
            f"resuming the interrupted search in {experiment}: finished trials are kept, running ones continue "
            "from their latest checkpoint"
        )
        outcomes.note("tune", outcomes.RESUMED, "finished trials kept, running ones from their latest checkpoint")
        tuner = ray_tune.Tuner.restore(
            search_path,
            trainable,
            storage_filesystem=search_fs,
            resume_unfinished=True,
            resume_errored=True,
            param_space=param_space(space, recipe.tune.algorithm),
        )
    else:
        outcomes.note("tune", outcomes.RECOMPUTED, state.why or "the interrupted search left nothing to restore")
        tuner = ray_tune.Tuner(
            trainable,
            param_space=param_space(space, recipe.tune.algorithm),
            tune_config=ray_tune.TuneConfig(
                metric=recipe.tune.metric,
                mode=recipe.tune.mode,
                search_alg=_search_algorithm(recipe, plan["concurrent"]),
                scheduler=_scheduler(recipe),
                num_samples=recipe.tune.num_samples,
            ),
            run_config=ray_tune.RunConfig(
                name="search",
                storage_path=storage.ray_storage(out_dir)[0],
                storage_filesystem=search_fs,
                callbacks=[progress],
                verbose=0,
                # A trial whose own actor is lost (its node went away: the trial function runs wherever
                # Ray places it) is started again, up to train.max_failures times; its Ray Train run
                # then continues from the trial's latest checkpoint (storage_path is the trial's folder).
                # Its workers' failures are Ray Train's to restart, within the trial.
                failure_config=ray_tune.FailureConfig(max_failures=recipe.train.max_failures),
            ),
        )
    log.info(
        f"{total} trial(s) of {', '.join(space)} ({recipe.tune.algorithm}"
        f"{', ASHA' if recipe.tune.early_stopping.asha else ''}); {plan['concurrent']} at a time, each "
        f"{plan['per_trial']}; budget {recipe.train.max_steps} steps per trial"
    )
    if not restoring:
        storage.remove(ended_file)  # left by a search that stopped before Tune saved its state
    release_orphaned_placement_groups()  # left by an earlier search this driver interrupted
    began = time.time()
    results = tuner.fit()
    release_orphaned_placement_groups()
    # Trials that ASHA stopped were killed with their Train workers, before those could remove their scratch.
    scratch.remove_on_every_node(
        [storage.join(context["trials_dir"], t) for t in _started_trials(context["trials_dir"])]
    )
    ended = storage.read_json(ended_file) or {}
    if len(ended) < total:
        unfinished = sorted(set(_started_trials(context["trials_dir"])) - set(ended))
        log.info(
            f"interrupted with {len(unfinished)} trial(s) unfinished; the state is saved: run the stage again "
            f"(or `raytune-app tune --recipe ... --resume`) to continue from {experiment}"
        )
        return {
            "stage": "tune",
            "fingerprint": current,
            "interrupted": True,
            "unfinished": unfinished,
            "ended": sorted(ended),
        }
    rows = report.trial_rows(results, recipe, space, context["trials_dir"])
    summary = report.finish(recipe, rows, space, out_dir, current, seconds=time.time() - began)
    log.info(
        f"done: best trial {summary['best']['trial_id']} ({recipe.tune.metric} {summary['best']['final_metric']:.4f}, "
        f"{summary['steps']['total']} trial-steps of {summary['steps']['budget']} budgeted); "
        f"best recipe {summary['best_recipe']}"
        + (
            f"; adapter models:/{summary['registered']['name']}/{summary['registered']['version']}"
            if summary.get("registered")
            else ""
        )
    )
    return summary
