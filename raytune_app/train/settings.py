"""The recipe's `train.dpo`, `train.grpo` and a chain step's `pairs` sections (preference and RL training).

Plain pydantic; no Ray. Every field documented where it is declared. The trainers that read them are
TRL's DPOTrainer and GRPOTrainer (raytune_app/train/worker.py); reward functions: raytune_app/train/rewards.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytune_app.sections import Section

# Loss types of TRL's DPOTrainer that need nothing beyond the pair itself (no unpaired data, no extra model).
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)


class DpoSection(Section):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (higher: stay closer)."
    )
    loss_type: Literal[DPO_LOSSES] = Field(
        "sigmoid",
        description="DPO loss (TRL's names): `sigmoid` (the DPO paper), `ipo`, `hinge`, `robust` "
        "(noisy labels, with label_smoothing), ...",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed share of flipped preference labels (conservative DPO / `robust`).",
    )
    precompute_reference: bool = Field(
        False,
        description="Score every pair with the reference model once before training instead of at every step "
        "(saves a forward pass per step when training for several epochs; costs one pass over the data up front).",
    )
    max_length: int | None = Field(
        None,
        gt=8,
        description="Longest prompt + answer in tokens; longer pairs are cut at the end. Default: data.max_seq_length.",
    )


class RewardSpec(Section):
    function: str = Field(
        ...,
        min_length=1,
        description="A built-in reward (`json_valid`, `json_schema`, `field_f1`, `exact_answer`, "
        "`length_penalty`, `format`; raytune_app/train/rewards.py) or `package.module:function` with TRL's signature "
        "`f(prompts, completions, **columns) -> list[float]` (columns include `reference`, the data's answer).",
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum GRPO normalises per group.")
    args: dict = Field(
        default_factory=dict,
        description="Settings of a built-in: json_schema `schema_file` (else the task's schema); "
        "exact_answer `marker` (default `####`); length_penalty `max_chars`, `per_char`; format `pattern` (regex the "
        "whole reply must match).",
    )


class GrpoSection(Section):
    num_generations: int = Field(
        4, ge=2, description="Completions sampled per prompt (the group rewards are compared within)."
    )
    beta: float = Field(
        0.04, ge=0, description="KL coefficient towards the reference model (0: no KL term, no reference pass)."
    )
    max_completion_length: int = Field(128, gt=0, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the completions.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="PPO-style clipping range of the policy ratio.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo",
        description="How token losses are averaged (TRL's names): `grpo` per sequence, `dapo` over all "
        "tokens of the batch, `dr_grpo` by a constant, `bnpo` per local batch.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Advantage = reward minus the group mean, divided by the std of the group / batch, or not.",
    )
    eval_prompts: int = Field(
        16,
        ge=1,
        description="Validation prompts answered (num_generations times each) at every checkpoint; the mean "
        "reward on them picks the best checkpoint.",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Reward functions, summed with their weights; at least one for method grpo.",
    )

    @model_validator(mode="after")
    def _check(self):
        names = [r.function for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"train.grpo.rewards lists a function twice ({names}); give each once with its weight")
        return self


class PairsSection(Section):
    """A chain step's preference data made from the previous step's own mistakes."""

    split: Literal["train", "val"] = Field(
        "train",
        description="Prepared split of the previous step's data whose prompts are answered (never the "
        "evaluation's test split).",
    )
    samples: int = Field(1, ge=1, le=16, description="Answers sampled per prompt (1: the greedy answer).")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature when samples > 1.")
    chosen: Literal["reference", "passing_sample"] = Field(
        "reference",
        description="`reference`: the data's answer is preferred; `passing_sample`: a sampled answer "
        "that scores as correct, when the model wrote one (else the reference).",
    )
    max_pairs_per_prompt: int = Field(1, ge=1, description="Failing answers kept per prompt (distinct texts).")
    limit: int | None = Field(None, gt=0, description="Answer only the first N prompts of the split.")
