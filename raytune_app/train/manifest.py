"""The train stage's manifest: what a finished training run made, from what, and how it went.

Written last into `runs/<name>/train/manifest.json` (its presence marks the run finished) and read by
the stages after it (evaluate, register, a chain's next step, the tune stage's MLflow logging). It is
validated when it is made and when it is read, so a field a later stage relies on cannot be missing
or mistyped; it reads like the JSON it is (`manifest["weights"]`) and like the typed record it is
(`manifest.weights`). Plain pydantic; no Ray.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytune_app import storage
from raytune_app.train.settings import METHODS


class TrainManifest(BaseModel):
    # Unknown keys are kept (a manifest written by a later version stays readable) but not required.
    model_config = ConfigDict(extra="allow")

    stage: Literal["train"] = "train"
    fingerprint: str = Field(description="Identifies the run: model, train section, seed, data, parent.")
    method: Literal[METHODS]  # type: ignore[valid-type]  # train/settings.py's list of methods
    finetuning: Literal["full", "lora", "qlora"]
    base_model: str = Field(description="model.path the run started from.")
    data_fingerprint: str = Field(description="The prepared (or distilled) data's fingerprint.")
    recipe_hash: str = Field(description="Hash of the model and train sections.")
    parent_adapter: str | None = Field(None, description="The adapter this run continued (a chain's previous step).")
    parent_fingerprint: str | None = None
    global_step: int = Field(ge=0)
    final_eval_loss: float | None = None
    final_eval: dict[str, float] = Field(
        default_factory=dict, description="The method's own validation numbers: DPO margins, GRPO rewards."
    )
    tokens_seen: int | None = None
    trainable_parameters: int = Field(ge=0)
    weights: str = Field(description="The saved adapter/ (or model/) folder.")
    best_checkpoint: str | None = None
    latest_checkpoint: str | None = None
    seconds_this_session: float = 0.0
    workers: int = Field(ge=1)
    use_gpu: bool
    worker_nodes: list[str] = Field(
        default_factory=list,
        description="The Ray node id of each worker (by world rank) in the attempt that finished the run.",
    )
    resumed_from_step: int | None = Field(
        None,
        description="The checkpoint step the attempt that finished the run started from (after a restart: Ray "
        "Train's after a failure, or --resume); None when it trained from the start.",
    )
    mlflow_run_id: str | None = Field(None, description="The MLflow run that tracks it, once logged.")
    chain: list[dict] | None = Field(None, description="For a chain's last step: every step's lineage.")

    # Read like the JSON file: manifest["weights"], manifest.get("parent_fingerprint").
    def __getitem__(self, key: str) -> Any:
        if key not in self.model_fields and key not in (self.model_extra or {}):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.model_fields or key in (self.model_extra or {}) else default

    def write(self, uri: str) -> None:
        data = self.model_dump(mode="json")
        if data.get("chain") is None:
            data.pop("chain", None)  # a single run's manifest, as it always was
        storage.write_text(uri, json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, uri: str) -> TrainManifest | None:
        """The manifest at `uri`, validated; None when there is none."""
        found = storage.read_json(uri)
        return None if found is None else cls.model_validate(found)
