"""The recipe's `registry` section: the MLflow tracking store, experiment and registered model.

Plain pydantic; no Ray. Read by raytune_app/registry/store.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raytune_app.sections import Section


class RegistrySection(Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (e.g. http://mlflow:5000 or databricks); left out: a SQLite store at "
        "<run dir>/mlflow.db with artefacts under <run dir>/mlartifacts.",
    )
    experiment: str | None = Field(None, description="MLflow experiment name; left out: the run name.")
    model_name: str | None = Field(
        None, description="Registered model name the adapters become versions of; left out: the run name."
    )
    promote: Literal["if_better", "always", "never"] = Field(
        "if_better",
        description="When a new version takes the `champion` alias (it always takes `challenger`): `if_better` when "
        "there is no champion or its primary evaluation metric is at least the champion's; `always`; `never`.",
    )
