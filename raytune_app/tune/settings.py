"""The recipe's `tune` section: the search space over `train` fields, the search algorithm, ASHA
early stopping and how many trials run at once (raytune_app/tune/run.py runs it on Ray Tune).

    tune:
      search_space:
        train.lora.rank: {choice: [4, 8, 16]}
        train.lora.alpha_ratio: {choice: [1, 2, 4]}       # alpha = ratio x rank: "alpha = 4 x rank" is one point
        train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
        train.scheduler: {choice: [cosine, linear, constant]}
      algorithm: optuna
      num_samples: 8

Every path names a field of the `train` section; `search_problems` checks the paths and every value
or bound against the train section's own validation before any trial starts. Plain pydantic; no Ray.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from raytune_app.sections import Section

# Not a field of `train`: a searched LoRA alpha expressed as a multiple of the searched rank.
ALPHA_RATIO = "train.lora.alpha_ratio"

# Fields a search may not vary, and why: they fix a trial's resources or the budget ASHA divides.
FIXED = {
    "train.workers": "each trial's workers are fixed (they decide the per-trial resources); set train.workers",
    "train.use_gpu": "each trial's resources are fixed; set train.use_gpu",
    "train.max_steps": "train.max_steps is the budget of every trial (ASHA's max_t); set it, not search it",
    "train.epochs": "the budget of every trial is train.max_steps",
    "train.checkpoint.every_steps": "trials report (and ASHA compares them) at every checkpoint; set it, not search it",
    "train.checkpoint.keep_best": "a storage setting, not a hyper-parameter",
    "train.max_failures": "a fault-tolerance setting, not a hyper-parameter",
    "train.worker_resources": "a placement setting, not a hyper-parameter",
    "train.method": "the method decides the data the trial reads; tune one method at a time",
    "train.logging_steps": "a logging setting, not a hyper-parameter",
}


class ParamSpec(Section):
    """How one field is sampled: exactly one of the keys."""

    choice: list[Any] | None = Field(
        None, description="Pick one of these values (random and optuna sample them; grid tries every one)."
    )
    uniform: tuple[float, float] | None = Field(None, description="A float drawn uniformly from [low, high].")
    loguniform: tuple[float, float] | None = Field(
        None, description="A float drawn uniformly in log space from [low, high] (learning rates); low must be above 0."
    )
    randint: tuple[int, int] | None = Field(None, description="An integer from low to high, both included.")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("choice is empty: list at least one value")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is None:
                continue
            low, high = bounds
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                raise ValueError(f"{kind} bounds must be [low, high] with low < high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs low > 0 (it samples the logarithm), got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list:
        """Values to check against the train section: every choice, or both bounds of a range."""
        return list(self.choice) if self.choice is not None else list(getattr(self, self.kind))


class EarlyStoppingSection(Section):
    asha: bool = Field(
        True,
        description="Stop trials early with ASHA (asynchronous successive halving): at each rung only the best "
        "1/reduction_factor of the trials that reached it continue. Off: every trial runs train.max_steps.",
    )
    grace_period: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps every trial runs before it can be stopped (the first rung); left out: "
        "train.checkpoint.every_steps (the first report).",
    )
    reduction_factor: float = Field(
        3.0,
        gt=1,
        description="Rung spacing and the share kept: rungs at grace_period x factor^k steps, and a trial "
        "continues past a rung when it is in the best 1/factor of the trials that reached it.",
    )


class TuneSection(Section):
    search_space: dict[str, ParamSpec] = Field(
        default_factory=dict,
        description="Fields of `train` to search, by path (e.g. train.lora.rank, train.learning_rate, train.scheduler, "
        "train.warmup, train.batch_size, train.lora.dropout), each with how it is sampled. `train.lora.alpha_ratio` "
        "searches alpha as a multiple of rank (alpha = ratio x rank); give it or train.lora.alpha, not both. Fields "
        "left out keep the recipe's value.",
    )
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="`random`: independent samples (seeded); `grid`: every combination of the `choice` "
        "values, num_samples times; `optuna`: Optuna's TPE sampler through Ray Tune, which proposes each trial "
        "from the results so far.",
    )
    num_samples: int = Field(
        8,
        gt=0,
        description="Trials to run (for `grid`: how many times the whole grid runs). Left out: 8, and 1 with "
        "`grid` (a second pass over the same grid with the same seed would only repeat the first).",
    )
    metric: str = Field(
        "eval_loss",
        pattern=r"^eval_[A-Za-z0-9_]+$",
        description="Validation metric reported at each checkpoint that trials are compared on: eval_loss, or another "
        "eval_* metric the trainer reports (eval_mean_token_accuracy with mode max).",
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `metric` is better.")
    early_stopping: EarlyStoppingSection = Field(
        default_factory=EarlyStoppingSection, description="ASHA early stopping on `metric`, in optimizer steps."
    )
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto",
        description="Trials running at once; `auto`: as many as the cluster fits (each trial is train.workers "
        "workers x one GPU, or x cpus_per_worker CPUs). A number above what fits is lowered to it.",
    )
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="CPUs each trial worker takes (torch uses that many threads); on a GPU cluster each worker "
        "also takes one GPU.",
    )
    seed: int | None = Field(None, description="Seed of the search algorithm; left out: run.seed.")
    register_best: bool = Field(
        True,
        description="Register the best trial's adapter in the MLflow model registry (every trial is logged as a "
        "run either way).",
    )

    @model_validator(mode="before")
    @classmethod
    def _grid_runs_once(cls, data):
        if isinstance(data, dict) and data.get("algorithm") == "grid" and "num_samples" not in data:
            return data | {"num_samples": 1}
        return data

    @model_validator(mode="after")
    def _check(self):
        if ALPHA_RATIO in self.search_space and "train.lora.alpha" in self.search_space:
            raise ValueError("search train.lora.alpha or train.lora.alpha_ratio, not both (the ratio sets alpha)")
        if self.metric.endswith("loss") and self.mode == "max":
            raise ValueError(f"metric {self.metric} is a loss: use mode min")
        if self.algorithm == "grid":
            ranged = [path for path, spec in self.search_space.items() if spec.kind != "choice"]
            if ranged:
                raise ValueError(
                    f"algorithm grid enumerates `choice` values; {ranged} are ranges: give them as choice, "
                    "or use algorithm random / optuna"
                )
        return self


def _field_at(cls: type[BaseModel] | None, parts: list[str]):
    """The pydantic field `parts` names inside `cls` (None when there is none), walking nested sections."""
    info = None
    for index, part in enumerate(parts):
        if cls is None or part not in cls.model_fields:
            return None
        info = cls.model_fields[part]
        annotation = info.annotation
        nested = next(
            (
                c
                for c in [annotation, *getattr(annotation, "__args__", ())]
                if isinstance(c, type) and issubclass(c, BaseModel)
            ),
            None,
        )
        if index < len(parts) - 1:
            cls = nested
        elif nested is not None:
            return "section"
    return info


def set_path(tree: dict, path: str, value) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way (a section left out, e.g. deepspeed)."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def apply_sample(train: dict, sample: dict) -> dict:
    """The `train` section (plain data) with one sampled point applied; `sample` maps paths to values."""
    import copy

    out = copy.deepcopy(train)
    for path, value in sample.items():
        if path != ALPHA_RATIO:
            set_path({"train": out}, path, value)
    if ALPHA_RATIO in sample:
        out.setdefault("lora", {})["alpha"] = float(sample[ALPHA_RATIO]) * int(out["lora"]["rank"])
    return out


def search_problems(tune: TuneSection, train: Any, has_chain: bool = False) -> list[str]:
    """Every problem of the search space against this recipe's train section (a TrainSection, which this
    module cannot import: train.settings imports it), one line each."""
    problems = []
    where = "tune.search_space"
    if has_chain:
        problems.append(
            "tune: a search tunes one training run; this recipe has a `chain` (tune a step as its own recipe)"
        )
    if train.max_steps is None:
        problems.append("tune: trials need a fixed budget: set train.max_steps (ASHA divides it into rungs)")
    elif train.max_steps % train.checkpoint.every_steps:
        problems.append(
            f"tune: train.max_steps ({train.max_steps}) must be a multiple of train.checkpoint.every_steps "
            f"({train.checkpoint.every_steps}): trials report at each checkpoint, and the last report must "
            "be the finished model"
        )
    grace = tune.early_stopping.grace_period
    if tune.early_stopping.asha and grace is not None and train.max_steps is not None and grace >= train.max_steps:
        problems.append(
            f"tune.early_stopping.grace_period ({grace}) must be below train.max_steps ({train.max_steps}), "
            "or no trial could ever be stopped early"
        )
    base = train.model_dump(mode="json")
    cls = type(train)
    for path, spec in tune.search_space.items():
        if not path.startswith("train."):
            problems.append(
                f"{where}.{path}: only fields of `train` can be searched (e.g. train.learning_rate); "
                "data and model changes need their own prepare"
            )
            continue
        if path in FIXED:
            problems.append(f"{where}.{path}: cannot be searched: {FIXED[path]}")
            continue
        if path == ALPHA_RATIO:
            bad = [v for v in spec.probe_values() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
            if bad:
                problems.append(f"{where}.{path}: alpha ratios must be numbers above 0, got {bad}")
            continue
        field = _field_at(cls, path.split(".")[1:])
        if field is None:
            owner = path.rsplit(".", 1)[0]
            problems.append(
                f"{where}.{path}: no such field in the recipe (check the spelling; "
                f"`raytune-app validate --explain` lists the fields of {owner})"
            )
            continue
        if field == "section":
            problems.append(f"{where}.{path}: is a section; search one of its fields (e.g. {path}.<field>)")
            continue
        for value in spec.probe_values():
            try:
                cls.model_validate(apply_sample(base, {path: value}))
            except ValidationError as exc:  # say which value and why, in the recipe's words
                reason = "; ".join(
                    e["msg"].replace("Input should be", "must be").replace("Value error, ", "") for e in exc.errors()
                )
                problems.append(f"{where}.{path}: value {value!r} is not valid for {path}: {reason}")
    return problems


def typed_space(tune: TuneSection, train: BaseModel) -> dict[str, ParamSpec]:
    """The search space with `choice` values converted to the field's type (YAML reads 1e-4 as a string)."""
    base = train.model_dump(mode="json")
    cls = type(train)
    out = {}
    for path, spec in tune.search_space.items():
        if spec.choice is None or path == ALPHA_RATIO:
            out[path] = spec
            continue
        values = []
        for value in spec.choice:
            checked = cls.model_validate(apply_sample(base, {path: value}))
            node: Any = checked
            for part in path.split(".")[1:]:
                node = getattr(node, part)
            values.append(node)
        out[path] = ParamSpec(choice=values)
    return out
