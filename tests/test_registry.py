"""MLflow tracking and model registry on a real local SQLite store: a train run logged, adapter
versions registered with lineage, aliases promoted and rolled back, through the API and the CLI."""

import json
import os

import pytest
from conftest import prepare_once, toy_recipe
from mlflow import MlflowClient

from raytune_app import cli, config
from raytune_app.evaluate.run import evaluate
from raytune_app.registry import store
from raytune_app.train.run import train


def with_registry(recipe, uri, **evaluate_fields):
    resolved = recipe.resolved()
    return config.validate(
        resolved
        | {
            "registry": {"tracking_uri": uri, "model_name": "extractor"},
            "evaluate": resolved["evaluate"] | evaluate_fields,
        }
    )


def read_manifest(recipe):
    return json.load(open(os.path.join(recipe.stage_dir("train"), "manifest.json")))


@pytest.mark.extended
def test_versions_lineage_aliases_and_rollback(toy_run, tiny_model, tmp_path, capsys):
    first_recipe, _ = toy_run
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = with_registry(first_recipe, uri, include_base=False)
    evaluate(first)
    [v1] = store.register_stage(first)
    assert v1["version"] == "1" and v1["champion"] == "1" and v1["promoted"]  # no champion yet: the first one is

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(v1["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.lora.rank"] == "4"
    assert "loss" in run.data.metrics and "eval_field_f1" in run.data.metrics
    assert len(client.get_metric_history(v1["run_id"], "loss")) >= 2  # the history, by step
    artifacts = {a.path for a in client.list_artifacts(v1["run_id"])}
    assert {"weights", "loss_curve.png", "recipe.yaml", "manifest.json"} <= artifacts
    manifest = read_manifest(first)
    tags = client.get_model_version("extractor", "1").tags
    assert tags["train_fingerprint"] == manifest["fingerprint"] and tags["base_model"] == tiny_model
    assert tags["data_fingerprint"] == manifest["data_fingerprint"] and tags["recipe_hash"] == manifest["recipe_hash"]
    assert (
        len(tags["data_manifest_sha256"]) == 16
        and tags["primary_metric"] == "field_f1"
        and "eval.schema_valid_rate" in tags
    )

    # Registering the same weights again finds the version; nothing new is created.
    assert store.register_stage(first)[0]["version"] == "1"
    assert len(client.search_model_versions("name = 'extractor'")) == 1

    # A second, different training run becomes version 2: the challenger. Unevaluated, it does not
    # take champion under promote: if_better.
    second = with_registry(toy_recipe(tmp_path, tiny_model, learning_rate=1e-3), uri)
    prepare_once(second)  # the toy run's prepared data, copied: same data, same settings
    train(second)
    [v2] = store.register_stage(second)
    assert (v2["version"], v2["champion"], v2["promoted"]) == ("2", "1", False)
    assert str(client.get_model_version_by_alias("extractor", "challenger").version) == "2"

    # The CLI: list, show, promote the challenger, roll back, and a clear error past the history.
    capsys.readouterr()  # drop what the stages printed
    assert cli.main(["registry", "list", "--tracking-uri", uri]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [
        {"name": "extractor", "versions": 2, "aliases": {"champion": "1", "challenger": "2"}, "latest": 2}
    ]
    assert cli.main(["registry", "promote", "extractor", "@challenger", "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "name": "extractor",
        "alias": "champion",
        "version": "2",
        "previous": "1",
    }
    assert cli.main(["registry", "show", "extractor", "@champion", "--tracking-uri", uri]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "2" and set(shown["aliases"]) == {"champion", "challenger"}
    assert shown["tags"]["train_fingerprint"] == read_manifest(second)["fingerprint"]
    assert cli.main(["registry", "rollback", "extractor", "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    assert str(client.get_model_version_by_alias("extractor", "champion").version) == "1"
    assert cli.main(["registry", "rollback", "extractor", "--tracking-uri", uri]) == 4
    assert "has no earlier version to roll back to" in capsys.readouterr().err
    assert cli.main(["registry", "show", "nosuch", "--tracking-uri", uri]) == 4
    assert "no registered model `nosuch` (registered models: extractor)" in capsys.readouterr().err

    assert cli.main(["registry", "promote", "extractor", "7", "--tracking-uri", uri]) == 4
    assert "no version 7 of model `extractor`" in capsys.readouterr().err

    # Serving resolves models:/<name>@champion to a local copy of the weights.
    local = store.download(uri, "models:/extractor@champion")
    assert os.path.exists(os.path.join(local, "adapter_config.json"))
    assert (
        store.version_of(uri, "models:/extractor@champion").version
        == store.version_of(uri, "models:/extractor/1").version
    )
    assert str(store.version_of(uri, "models:/extractor").version) == "2"  # no version or alias: the latest
    with pytest.raises(store.RegistryError, match="cannot fetch models:/extractor@nosuch"):
        store.download(uri, "models:/extractor@nosuch")

    # The evaluate stage takes a registry URI as the weights to score, identified by their lineage.
    scored = evaluate(first, adapter="models:/extractor@champion")
    assert list(scored["models"]) == ["extractor@champion"]
    assert scored["models"]["extractor@champion"]["identity"] == read_manifest(first)["fingerprint"]
