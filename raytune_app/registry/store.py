"""Tracking and model registry on MLflow: train runs, adapter versions with lineage, aliases.

    raytune-app registry list                       [--recipe R | --tracking-uri URI]
    raytune-app registry show NAME [VERSION|@ALIAS]
    raytune-app registry promote NAME VERSION [--alias champion]
    raytune-app registry rollback NAME [--alias champion]

The store is `registry.tracking_uri` from the recipe, or by default a SQLite database in the run
directory (`<run dir>/mlflow.db`, artefacts in `<run dir>/mlartifacts/`): real MLflow, no server
needed; point `tracking_uri` at a tracking server on a cluster and nothing else changes.

- `log_train_run`: one MLflow run per training run (tag `train_fingerprint`), with the resolved
  recipe as params, the logged history as metrics (by step) and the weights, loss curve, recipe and
  manifests as artefacts. Idempotent: a finished run with the same fingerprint is reused.
- `register`: the run's weights become a version of the registered model, tagged with their lineage
  (base model, data fingerprint and manifest hash, recipe hash, parent run and version) and the
  evaluation metrics. The newest version takes the alias `challenger`; `champion` moves by
  `registry.promote` (if_better / always / never). Every move of an alias is recorded in a tag of the
  registered model (`alias_history.<alias>`), which is what `rollback` undoes.
- `download("models:/<name>@champion")`: a local copy of that version's weights (for serving).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from raytune_app import integrity, storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError
from raytune_app.train.manifest import TrainManifest

CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(DataError):
    """A registry request that cannot be done; the message says why and what to do."""


def tracking_uri(recipe: Recipe) -> str:
    if recipe.registry.tracking_uri:
        return recipe.registry.tracking_uri
    run_dir = storage.absolute(recipe.run_dir)
    if "://" in run_dir:
        raise RegistryError(
            f"run.output_dir is remote ({run_dir}): a SQLite store cannot live there; set "
            "registry.tracking_uri to an MLflow tracking server (or a database: sqlite:////shared/mlflow.db); "
            f"the artefacts still go to the run's bucket ({run_dir}/mlartifacts)"
        )
    os.makedirs(run_dir, exist_ok=True)
    return f"sqlite:///{run_dir}/mlflow.db"


def model_name(recipe: Recipe) -> str:
    return recipe.registry.model_name or recipe.run.name


def client(uri: str):
    """An MlflowClient for tracking and registry at `uri` (quiet: no migration chatter on first use)."""
    import logging

    from mlflow import MlflowClient

    from raytune_app import console

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)
    console.quiet_libraries(ray_data=False)  # MLflow's own console handlers: into the run's log file
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(mlflow_client, recipe: Recipe) -> str:
    name = recipe.registry.experiment or recipe.run.name
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    run_dir = storage.absolute(recipe.run_dir)
    if storage.is_remote(run_dir):
        # Artefacts live beside the run on its bucket (MLflow writes them with boto3 / the GCS client,
        # which read the same AWS_* variables as storage.py), whatever store keeps the metadata.
        location = f"{run_dir.rstrip('/')}/mlartifacts"
    elif not recipe.registry.tracking_uri:
        location = f"file://{run_dir}/mlartifacts"
    return mlflow_client.create_experiment(name, artifact_location=location)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def _runs_with(mlflow_client, experiment_id: str, tag: str, value: str) -> list:
    return mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.{tag} = '{value}'", order_by=["attributes.start_time DESC"]
    )


def log_train_run(recipe: Recipe, manifest: TrainManifest | dict) -> str:
    """Log a finished training run (params, metric history, artefacts); returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    mlflow_client = client(tracking_uri(recipe))
    experiment_id = _experiment_id(mlflow_client, recipe)
    for run in _runs_with(mlflow_client, experiment_id, "train_fingerprint", manifest["fingerprint"]):
        if run.info.status == "FINISHED":
            return run.info.run_id
    train_dir = manifest["weights"].rsplit("/", 1)[0]  # weights sit in <train dir>/adapter (or /model)
    tags = {
        "stage": "train",
        "train_fingerprint": manifest["fingerprint"],
        "base_model": manifest["base_model"],
        "data_fingerprint": manifest["data_fingerprint"],
        "recipe_hash": manifest["recipe_hash"],
        "parent_fingerprint": manifest.get("parent_fingerprint") or "",
        "mlflow.runName": f"train-{manifest['fingerprint']}",
    }
    run = mlflow_client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    try:
        params = _flatten(
            {
                "model": recipe.model.model_dump(mode="json"),
                "train": recipe.train.model_dump(mode="json"),
                "data": recipe.data.model_dump(mode="json", exclude={"system_prompt"}),
            }
        )
        param_list = [Param(k, str(v)[:6000]) for k, v in params.items()]
        history_uri = storage.join(train_dir, "metrics.jsonl")
        history = (
            [json.loads(line) for line in storage.read_text(history_uri).splitlines()]
            if storage.exists(history_uri)
            else []
        )
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, int(entry["step"]))
            for entry in history
            for key, value in entry.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        # MLflow takes at most 1000 metrics and 100 params per batch call.
        for i in range(0, len(param_list), 100):
            mlflow_client.log_batch(run_id, params=param_list[i : i + 100])
        for i in range(0, len(metrics), 1000):
            mlflow_client.log_batch(run_id, metrics=metrics[i : i + 1000])
        mlflow_client.log_batch(run_id, tags=[RunTag("global_step", str(manifest["global_step"]))])
        # Never register weights cut short by a crash or a full disk: name the file instead.
        integrity.check_weights(manifest["weights"], f"the weights of training run {manifest['fingerprint']}")
        mlflow_client.log_artifacts(run_id, storage.local_dir(manifest["weights"]), "weights")
        for name in ("loss_curve.png", "recipe.yaml", "manifest.json", "metrics.jsonl"):
            uri = storage.join(train_dir, name)
            if storage.exists(uri):
                _log_artifact_file(mlflow_client, run_id, uri)
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _log_artifact_file(mlflow_client, run_id: str, uri: str, artifact_path: str | None = None) -> None:
    import tempfile

    if "://" not in uri:
        mlflow_client.log_artifact(run_id, uri, artifact_path)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, uri.rsplit("/", 1)[-1])
        with open(local, "wb") as out:
            out.write(storage.read_bytes(uri))
        mlflow_client.log_artifact(run_id, local, artifact_path)


# ----------------------------------------------------------------------------------- versions


def _history(mlflow_client, name: str, alias: str) -> list[str]:
    model = mlflow_client.get_registered_model(name)
    return json.loads(model.tags.get(f"alias_history.{alias}", "[]"))


def _current(mlflow_client, name: str, alias: str) -> str | None:
    version = mlflow_client.get_registered_model(name).aliases.get(alias)  # an int in MLflow's answer
    return None if version is None else str(version)


def set_alias(mlflow_client, name: str, alias: str, version: str) -> str | None:
    """Point `alias` at `version`, recording the move; returns the version it pointed at before."""
    before = _current(mlflow_client, name, alias)
    if before == str(version):
        return before
    history = _history(mlflow_client, name, alias) + [str(version)]
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    mlflow_client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history[-50:]))
    return before


def _version_for(mlflow_client, name: str, fingerprint: str):
    found = mlflow_client.search_model_versions(f"name = '{name}' and tag.train_fingerprint = '{fingerprint}'")
    return mlflow_client.get_model_version(name, found[0].version) if found else None


def _manifest_hash(recipe: Recipe) -> str:
    uri = storage.join(storage.current(storage.absolute(recipe.stage_dir("prepare"))), "manifest.json")
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16] if storage.exists(uri) else ""


def _ensure_registered_model(mlflow_client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        mlflow_client.create_registered_model(name, description=description)


def register(
    recipe: Recipe, manifest: TrainManifest | dict, evaluation: dict | None = None, candidate: str = "tuned"
) -> dict:
    """Register the trained weights of `manifest` as a model version (or find the existing one),
    attach lineage and evaluation metrics, and move the aliases. Returns a summary of the version."""
    name = model_name(recipe)
    mlflow_client = client(tracking_uri(recipe))
    run_id = log_train_run(recipe, manifest)
    _ensure_registered_model(
        mlflow_client, name, f"Adapters trained by the recipe run `{recipe.run.name}` on {recipe.model.path}."
    )
    version = _version_for(mlflow_client, name, manifest["fingerprint"])
    new = version is None
    if version is None:
        parent = (
            _version_for(mlflow_client, name, manifest["parent_fingerprint"])
            if manifest.get("parent_fingerprint")
            else None
        )
        tags = {
            "train_fingerprint": manifest["fingerprint"],
            "base_model": manifest["base_model"],
            "data_fingerprint": manifest["data_fingerprint"],
            "data_manifest_sha256": _manifest_hash(recipe),
            "recipe_hash": manifest["recipe_hash"],
            "method": manifest["method"],
            "finetuning": manifest["finetuning"],
            "parent_fingerprint": manifest.get("parent_fingerprint") or "",
            "parent_version": parent.version if parent else "",
            "global_step": str(manifest["global_step"]),
            "final_eval_loss": str(manifest.get("final_eval_loss")),
        }
        source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/weights"
        version = mlflow_client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags=tags,
            description=f"{manifest['finetuning']} {manifest['method']} of "
            f"{manifest['base_model']}, step {manifest['global_step']}",
        )
    number = str(version.version)
    primary = None
    if evaluation is not None and candidate in evaluation["models"]:
        scores = evaluation["models"][candidate]
        primary = scores.get(evaluation["primary_metric"])
        mlflow_client.set_model_version_tag(name, number, "primary_metric", evaluation["primary_metric"])
        for key in (
            "schema_valid_rate",
            "json_parse_rate",
            "field_f1",
            "exact_match",
            "accuracy",
            "macro_f1",
            "mcc",
            "ece",
            "normalised_match",
        ):
            if scores.get(key) is not None:
                mlflow_client.set_model_version_tag(name, number, f"eval.{key}", str(scores[key]))
                mlflow_client.log_metric(run_id, f"eval_{key}", float(scores[key]))
        mlflow_client.log_metric(run_id, "eval_latency_p50_s", float(scores["latency"]["p50_s"]))
    set_alias(mlflow_client, name, CHALLENGER, number)
    promoted = _should_promote(mlflow_client, name, number, recipe.registry.promote)
    if promoted:
        set_alias(mlflow_client, name, CHAMPION, number)
    return {
        "name": name,
        "version": number,
        "run_id": run_id,
        "tracking_uri": tracking_uri(recipe),
        "primary_metric": primary,
        "champion": _current(mlflow_client, name, CHAMPION),
        "promoted": promoted,
        "new": new,
    }


def register_guard(recipe: Recipe, folder: str, summary: dict) -> dict:
    """Log a trained guard (model/ + guard.json in `folder`) as an MLflow run and a version of the
    registered model `guard.registered_name`: challenger always, champion per registry.promote on the
    validation TPR at the chosen threshold. Serving loads `models:/<name>@champion`."""
    from mlflow.entities import Metric, Param

    name = recipe.guard.registered_name
    uri = tracking_uri(recipe)
    mlflow_client = client(uri)
    run = mlflow_client.create_run(
        _experiment_id(mlflow_client, recipe), tags={"stage": "guard", "mlflow.runName": f"guard-{name}"}
    )
    run_id = run.info.run_id
    validation = {
        k: v for k, v in summary["validation"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    now = int(time.time() * 1000)
    mlflow_client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in _flatten(recipe.guard.model_dump(mode="json")).items()],
        metrics=[Metric(f"val_{k}", float(v), now, 0) for k, v in validation.items()],
    )
    mlflow_client.log_artifacts(run_id, storage.local_dir(storage.join(folder, "model")), "guard/model")
    _log_artifact_file(mlflow_client, run_id, storage.join(folder, "guard.json"), "guard")
    mlflow_client.set_terminated(run_id, "FINISHED")
    _ensure_registered_model(
        mlflow_client, name, "Prompt-injection / jailbreak guard classifiers (raytune-app guard train)."
    )
    tags = {
        "base_model": summary["base"],
        "threshold": str(summary["threshold"]),
        "target_fpr": str(summary["target_fpr"]),
        "sources": ",".join(summary["sources"]),
        "primary_metric": "tpr",
        **{f"eval.{k}": str(v) for k, v in validation.items()},
    }
    version = mlflow_client.create_model_version(
        name,
        source=f"{mlflow_client.get_run(run_id).info.artifact_uri}/guard",
        run_id=run_id,
        tags=tags,
        description=f"guard on {summary['base']}",
    )
    number = str(version.version)
    set_alias(mlflow_client, name, CHALLENGER, number)
    promoted = _should_promote(mlflow_client, name, number, recipe.registry.promote)
    if promoted:
        set_alias(mlflow_client, name, CHAMPION, number)
    return {
        "name": name,
        "version": number,
        "run_id": run_id,
        "tracking_uri": uri,
        "champion": _current(mlflow_client, name, CHAMPION),
        "promoted": promoted,
    }


def register_export(recipe: Recipe, folder: str, lineage: dict) -> dict:
    """An export (`raytune-app export --register`: merged safetensors or GGUF in `folder`) as a version of
    `<model name>-merged`, tagged `type: merged` with its lineage. A registered model of its own, so that
    serving, which loads adapter versions of `<model name>`, never mistakes it for an adapter."""
    adapters = lineage.get("registered_model") or model_name(recipe)
    name = f"{adapters}-merged"
    uri = tracking_uri(recipe)
    mlflow_client = client(uri)
    run = mlflow_client.create_run(
        _experiment_id(mlflow_client, recipe), tags={"stage": "export", "mlflow.runName": f"export-{lineage['format']}"}
    )
    run_id = run.info.run_id
    mlflow_client.log_artifacts(run_id, folder, "export")
    mlflow_client.set_terminated(run_id, "FINISHED")
    parent = lineage.get("registered_version")
    if parent is None and lineage.get("train_fingerprint"):
        try:
            found = _version_for(mlflow_client, adapters, lineage["train_fingerprint"])
        except Exception:  # the adapter's registered model may not exist (never registered)
            found = None
        parent = found.version if found is not None else None
    _ensure_registered_model(mlflow_client, name, f"Standalone exports (merged, GGUF) of the adapters of `{adapters}`.")
    tags = {
        "type": "merged",
        "format": lineage["format"],
        "dtype": lineage["dtype"],
        "quantization": (lineage.get("gguf") or {}).get("quantization", ""),
        "base_model": lineage.get("base_model") or "",
        "train_fingerprint": lineage.get("train_fingerprint") or "",
        "parent_model": adapters,
        "parent_version": str(parent or ""),
        "merge_max_abs_logit_diff": str(lineage["merge_check"]["max_abs_logit_diff"]),
    }
    version = mlflow_client.create_model_version(
        name,
        source=f"{mlflow_client.get_run(run_id).info.artifact_uri}/export",
        run_id=run_id,
        tags=tags,
        description=f"{lineage['format']} export ({lineage['dtype']}) of {adapters} version {parent or '?'}",
    )
    return {"name": name, "version": str(version.version), "run_id": run_id, "tracking_uri": uri}


def register_stage(recipe: Recipe) -> list[dict]:
    """The register stage: every trained run of the recipe (each chain step, in order, so a step's
    parent is already a version) becomes a version, with the evaluation of it where there is one."""
    from raytune_app import outcomes

    run_dir = storage.absolute(recipe.run_dir)
    if recipe.chain:
        chain = _load(storage.join(run_dir, "chain.json"), "the training chain")
        runs = [
            (step["step"], storage.join(run_dir, "chain", step["step"], "train", "manifest.json"))
            for step in chain["chain"]
        ]
    else:
        runs = [("tuned", storage.join(storage.absolute(recipe.stage_dir("train")), "manifest.json"))]
    evaluation_uri = storage.join(storage.current(storage.absolute(recipe.stage_dir("evaluate"))), "metrics.json")
    evaluation = storage.read_json(evaluation_uri)
    out = []
    for candidate, manifest_uri in runs:
        manifest = _load(manifest_uri, "the training run")
        scores = (evaluation or {}).get("models", {}).get(candidate, {})
        # Metrics count only when they were measured on these very weights.
        matching = evaluation if scores.get("identity") == manifest["fingerprint"] else None
        version = register(recipe, manifest, matching, candidate)
        outcomes.note(
            "register" if candidate == "tuned" else f"register[{candidate}]",
            outcomes.RECOMPUTED if version["new"] else outcomes.REUSED,
            f"version {version['version']}" + (" registered now" if version["new"] else ""),
        )
        out.append(version)
    return out


def _load(uri: str, what: str) -> dict:
    """A finished run's record; RegistryError naming the file when it is missing or damaged."""
    try:
        return storage.load_json(uri)
    except FileNotFoundError:
        raise RegistryError(
            f"no finished training run at {uri.rsplit('/', 1)[0]}; run `raytune-app train` first"
        ) from None
    except storage.Damaged as exc:
        raise RegistryError(f"{what}: {exc}; run `raytune-app train` again") from None


def _score(mlflow_client, name: str, version: str) -> float | None:
    tags = mlflow_client.get_model_version(name, version).tags
    value = tags.get(f"eval.{tags.get('primary_metric')}")
    return float(value) if value not in (None, "None") else None


def _should_promote(mlflow_client, name: str, version: str, policy: str) -> bool:
    champion = _current(mlflow_client, name, CHAMPION)
    if champion == version:
        return True
    if policy == "never":
        return False
    if policy == "always" or champion is None:
        return True
    new, old = _score(mlflow_client, name, version), _score(mlflow_client, name, champion)
    return new is not None and (old is None or new >= old)


# ------------------------------------------------------------------------------------ queries


def list_models(uri: str) -> list[dict]:
    mlflow_client = client(uri)
    out = []
    for model in mlflow_client.search_registered_models():
        versions = mlflow_client.search_model_versions(f"name = '{model.name}'")
        out.append(
            {
                "name": model.name,
                "versions": len(versions),
                "aliases": {a: str(v) for a, v in model.aliases.items()},
                "latest": max((int(v.version) for v in versions), default=None),
            }
        )
    return out


def resolve_version(mlflow_client, name: str, ref: str | None):
    """A ModelVersion from a version number, `@alias`, or None (the latest)."""
    from mlflow.exceptions import MlflowException

    known = sorted(m.name for m in mlflow_client.search_registered_models())
    if name not in known:
        raise RegistryError(f"no registered model `{name}` (registered models: {', '.join(known) or 'none'})")
    try:
        if ref is None:
            versions = mlflow_client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"model `{name}` has no versions yet")
            return mlflow_client.get_model_version(name, str(max(int(v.version) for v in versions)))
        if ref.startswith("@"):
            return mlflow_client.get_model_version_by_alias(name, ref[1:])
        return mlflow_client.get_model_version(name, ref)
    except MlflowException as exc:
        raise RegistryError(f"no version {ref} of model `{name}`: {exc.message.splitlines()[0]}") from None


def show(uri: str, name: str, ref: str | None = None) -> dict:
    mlflow_client = client(uri)
    version = resolve_version(mlflow_client, name, ref)
    model = mlflow_client.get_registered_model(name)
    return {
        "name": name,
        "version": str(version.version),
        "aliases": [a for a, v in model.aliases.items() if str(v) == str(version.version)],
        "source": version.source,
        "run_id": version.run_id,
        "description": version.description,
        "tags": dict(sorted(version.tags.items())),
    }


def promote(uri: str, name: str, ref: str, alias: str = CHAMPION) -> dict:
    mlflow_client = client(uri)
    version = str(resolve_version(mlflow_client, name, ref).version)
    before = set_alias(mlflow_client, name, alias, version)
    return {"name": name, "alias": alias, "version": version, "previous": before}


def rollback(uri: str, name: str, alias: str = CHAMPION) -> dict:
    """Point `alias` back at the version it held before its last move."""
    mlflow_client = client(uri)
    resolve_version(mlflow_client, name, f"@{alias}")  # a clear error when the alias is not set
    history = _history(mlflow_client, name, alias)
    if len(history) < 2:
        raise RegistryError(f"`{name}@{alias}` has no earlier version to roll back to (history: {history or 'empty'})")
    current, previous = history[-1], history[-2]
    mlflow_client.set_registered_model_alias(name, alias, previous)
    mlflow_client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history[:-1]))
    return {"name": name, "alias": alias, "version": previous, "rolled_back_from": current}


def version_of(recipe_or_uri, model_uri: str):
    """The ModelVersion that `models:/<name>/<version>` or `models:/<name>@<alias>` names now."""
    uri = recipe_or_uri if isinstance(recipe_or_uri, str) else tracking_uri(recipe_or_uri)
    path = model_uri.removeprefix("models:/").strip("/")
    name, at, alias = path.partition("@")
    if not at:
        name, _, number = path.partition("/")
    return resolve_version(client(uri), name, f"@{alias}" if at else (number or None))


def download(recipe_or_uri, model_uri: str, dst: str | None = None) -> str:
    """A local folder with the weights of `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    import tempfile

    import mlflow

    uri = recipe_or_uri if isinstance(recipe_or_uri, str) else tracking_uri(recipe_or_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=dst or tempfile.mkdtemp(prefix="raytune-model-")
        )
    except Exception as exc:  # MlflowException and the store's own errors: say which URI failed
        raise RegistryError(f"cannot fetch {model_uri} from {uri}: {str(exc).splitlines()[0]}") from None


def retire(uri: str, name: str, alias: str, version: str, reason: str) -> dict:
    """Move `alias` off `version` (an automatic rollback): back to the version it named before, or
    removed when it named none. Nothing moves if the alias was pointed elsewhere in the meantime."""
    mlflow_client = client(uri)
    if _current(mlflow_client, name, alias) != str(version):
        return {"name": name, "alias": alias, "moved": False, "why": f"{alias} no longer names version {version}"}
    history = _history(mlflow_client, name, alias)
    earlier = [v for v in history if v != str(version)]
    if earlier:
        mlflow_client.set_registered_model_alias(name, alias, earlier[-1])
    else:
        mlflow_client.delete_registered_model_alias(name, alias)
    mlflow_client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(earlier))
    mlflow_client.set_model_version_tag(name, str(version), f"retired_from.{alias}", reason[:500])
    return {"name": name, "alias": alias, "moved": True, "from": str(version), "to": earlier[-1] if earlier else None}
