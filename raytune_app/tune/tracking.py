"""The tune stage in MLflow: one parent run per search, a child run per trial, the best adapter registered.

Trials that ran to the end are logged as the train stage logs a run (registry/store.py
`log_train_run`: params, metric history, weights), so registering the best one reuses that run; a
trial stopped early (or failed) gets a run with its sampled params, the metrics it reported by step
and the status KILLED (or FAILED). Every trial run carries the tag `tune_trial` = <search
fingerprint>/<trial id> and points at the search run (`mlflow.parentRunId`), which holds the table,
the plot and the best recipe. Re-logging the same search finds these runs instead of adding more.

A store that cannot be reached must not cost the search: the failure is reported and the results on
disk stand (as in the train stage).
"""

from __future__ import annotations

import json
import time

from raytune_app import console, storage
from raytune_app.config import Recipe
from raytune_app.tune.trials import trial_recipe


def _find(mlflow_client, experiment_id: str, tag: str, value: str):
    from raytune_app.registry import store

    found = store._runs_with(mlflow_client, experiment_id, tag, value)
    return found[0].info.run_id if found else None


def _trial_run(mlflow_client, experiment_id: str, recipe: Recipe, row: dict, fingerprint: str, parent: str) -> str:
    from mlflow.entities import Metric, Param, RunTag

    from raytune_app.registry import store

    key = f"{fingerprint}/{row['trial_id']}"
    tags = [
        RunTag("tune_trial", key),
        RunTag("mlflow.parentRunId", parent),
        RunTag("tune_status", row["status"]),
        RunTag("stopped_early", str(row["stopped_early"]).lower()),
        RunTag("steps_run", str(row["steps"])),
    ]
    if row["status"] == "completed":
        manifest = json.loads(storage.read_text(storage.join(row["dir"], "manifest.json")))
        run_id = store.log_train_run(trial_recipe(recipe.resolved(), row["config"], recipe.source_path), manifest)
        mlflow_client.log_batch(run_id, tags=tags)
        return run_id
    existing = _find(mlflow_client, experiment_id, "tune_trial", key)
    if existing:
        return existing
    run = mlflow_client.create_run(
        experiment_id, tags={"stage": "tune-trial", "mlflow.runName": f"trial-{row['trial_id']}"}
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(path, json.dumps(value)) for path, value in row["config"].items()]
    metrics = [Metric(name, value, now, step) for name, points in row["history"].items() for step, value in points]
    mlflow_client.log_batch(run_id, params=params, tags=tags)
    for i in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=metrics[i : i + 1000])
    mlflow_client.set_terminated(run_id, "FAILED" if row["status"] == "failed" else "KILLED")
    return run_id


def log_search(recipe: Recipe, rows: list[dict], best: dict, summary: dict, out_dir: str) -> dict:
    """Log the search and its trials; register the best trial's weights. Returns what to add to the summary.
    Tracking never costs the search: a store that cannot be reached, or no MLflow installed (a bare GPU image),
    is reported and the results stay on disk."""
    try:
        from mlflow.entities import Metric, Param

        from raytune_app.registry import store

        uri = store.tracking_uri(recipe)
        mlflow_client = store.client(uri)
        experiment_id = store._experiment_id(mlflow_client, recipe)
        fingerprint = summary["fingerprint"]
        parent = _find(mlflow_client, experiment_id, "tune_fingerprint", fingerprint)
        if parent is None:
            parent = mlflow_client.create_run(
                experiment_id,
                tags={"stage": "tune", "tune_fingerprint": fingerprint, "mlflow.runName": f"tune-{fingerprint}"},
            ).info.run_id
            now = int(time.time() * 1000)
            params = [
                Param(k, str(v)[:6000])
                for k, v in store._flatten({"tune": recipe.tune.model_dump(mode="json")}).items()
            ]
            mlflow_client.log_batch(
                parent,
                params=params,
                metrics=[
                    Metric(f"best_{recipe.tune.metric}", float(best["final_metric"]), now, 0),
                    Metric("trial_steps", float(summary["steps"]["total"]), now, 0),
                    Metric("trials_stopped_early", float(summary["stopped_early"]), now, 0),
                ],
            )
            for name in ("trials.md", "trials.json", "tune_plot.png", "best_recipe.yaml"):
                store._log_artifact_file(mlflow_client, parent, storage.join(out_dir, name))
            mlflow_client.set_terminated(parent, "FINISHED")
        runs = {
            row["trial_id"]: _trial_run(mlflow_client, experiment_id, recipe, row, fingerprint, parent) for row in rows
        }
        out = {"mlflow": {"tracking_uri": uri, "search_run_id": parent, "trial_run_ids": runs}}
        if recipe.tune.register_best and best["status"] == "completed":
            manifest = json.loads(storage.read_text(storage.join(best["dir"], "manifest.json")))
            version = store.register(trial_recipe(recipe.resolved(), best["config"], recipe.source_path), manifest)
            out["registered"] = {"name": version["name"], "version": version["version"], "run_id": version["run_id"]}
            console.logger("tune").info(
                f"best adapter registered: models:/{version['name']}/{version['version']} (alias challenger"
                f"{', champion' if version['promoted'] else ''}) in {uri}"
            )
        return out
    except Exception as exc:  # any store or network failure; the search results are on disk
        console.logger("tune").warning(
            f"could not log the search to MLflow ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"the results are in {out_dir}"
        )
        return {"mlflow": None}
