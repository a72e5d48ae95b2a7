"""The recipe's `evaluate` section: which metrics, on which split, with which generation settings.

Plain pydantic; no Ray. Read by raytune_app/evaluate/run.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytune_app.sections import Section


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
    base_shots: int = Field(
        0,
        ge=0,
        le=64,
        description="Few-shot prompting for the base model: the first N examples of the prepared train split go "
        "before each prompt as earlier user / assistant turns, so the base is shown the answer format it was never "
        "trained on (the fair baseline for a fine-tune). Trained models are asked as they were trained, without.",
    )
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per example.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy decoding (reproducible).")
    batch_size: int = Field(16, gt=0, description="Examples per `generate` call (prompts are sorted by length first).")
    replicas: int | Literal["auto"] = Field(
        "auto",
        description="Model replicas in the Ray Data actor pool; `auto`: one per GPU, or one on a CPU-only cluster.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Inference precision; `auto` follows train.precision (vLLM on a CPU without native bf16 "
        "runs fp32).",
    )
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="Generation engine: `vllm` (Ray Data's LLM processor, `ray.data.llm`: one vLLM engine per "
        "replica answers the base and every LoRA adapter under test), `transformers` (generate on an actor pool, "
        "the adapter merged in), or `auto`: vllm wherever vLLM is installed.",
    )
    schema_constrained: bool = Field(
        False,
        description="Task structured with the vllm backend: decode every example a second time constrained to "
        "the JSON Schema (vLLM structured outputs) and report those metrics (`constrained`) beside the free ones.",
    )
    adapters: Literal["auto", "merged", "lora"] = Field(
        "auto",
        description="How the vllm backend runs a LoRA adapter under test: `merged` (merged into a copy of the base "
        "first, as `raytune-app export` does, in an engine of its own), `lora` (a LoRA request in the base's "
        "engine, as serving runs it), `auto`: lora on a GPU; on a CPU, where vLLM's LoRA kernels decoded the "
        "quickstart's adapter five to seven times slower than a merged copy, merged once the examples x "
        "max_new_tokens plus a third of the prompt tokens reach 8,000 (below that a second engine's start costs "
        "more than it saves).",
    )
    kv_cache_gb: int = Field(
        1, ge=1, description="vLLM's KV cache in whole GiB on a CPU (VLLM_CPU_KVCACHE_SPACE); a GPU sizes its own."
    )
    enforce_eager: bool = Field(
        False, description="vLLM without torch.compile / CUDA graphs: starts sooner, decodes slower (small runs)."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.labels is not None and self.task != "classification":
            raise ValueError("labels apply to task classification only")
        if self.schema_constrained and self.task != "structured":
            raise ValueError("schema_constrained applies to task structured only (it needs a JSON Schema)")
        if self.schema_constrained and self.backend == "transformers":
            raise ValueError("schema_constrained needs backend vllm (or auto with vLLM installed)")
        return self
