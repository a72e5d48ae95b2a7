"""The recipe's `train` section: method, fine-tuning (LoRA / QLoRA / full), DeepSpeed, schedule, checkpoints,
and its `train.dpo`, `train.grpo` and a chain step's `pairs` sections (preference and RL training).

Plain pydantic; no Ray. Every field documented where it is declared. The trainers that read them are
TRL's DPOTrainer and GRPOTrainer (raytune_app/train/worker.py); reward functions: raytune_app/train/rewards.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytune_app.distill.settings import TrainDistillSection
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
    "sft",  # the chosen answer's NLL: combined with a preference loss (e.g. [sigmoid, sft]) it keeps likelihood up
)
# Methods that learn from preference pairs (data.kind preference): DPO, and TRL's ORPO, SimPO (its CPO trainer
# with the simpo loss) and KTO (the pairs unpaired into desirable / undesirable answers).
PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")
# Every train.method (the recipe's field and the train manifest's read it from here).
METHODS = ("sft", *PREFERENCE_METHODS, "grpo")


class DpoSection(Section):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (higher: stay closer)."
    )
    loss_type: Literal[DPO_LOSSES] | list[Literal[DPO_LOSSES]] = Field(  # type: ignore[valid-type]  # one list of names
        "sigmoid",
        description="DPO loss (TRL's names): `sigmoid` (the DPO paper), `ipo`, `hinge`, `robust` "
        "(noisy labels, with label_smoothing), ...; a list combines losses, e.g. [sigmoid, sft] (DPO plus the "
        "chosen answer's NLL, which keeps DPO from lowering the likelihood of good answers).",
    )
    loss_weights: list[float] | None = Field(
        None, description="Weights of the losses in a `loss_type` list (default: 1 each)."
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

    @model_validator(mode="after")
    def _weights_match(self):
        losses = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(losses)} loss type(s)")
        return self

    @property
    def losses(self) -> list[str]:
        return self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]


class OrpoSection(Section):
    beta: float = Field(
        0.1, gt=0, description="Weight of the odds-ratio term beside the SFT loss (ORPO's lambda); no reference model."
    )
    max_length: int | None = Field(
        None, gt=8, description="Longest prompt + answer in tokens; longer pairs are cut. Default: data.max_seq_length."
    )


class SimpoSection(Section):
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward (SimPO's beta; paper: 2-2.5).")
    gamma_beta_ratio: float = Field(
        0.5, ge=0, description="Target reward margin as a fraction of beta (SimPO's gamma / beta; paper: 0.3-0.8)."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen answer (CPO-SimPO); 0 is plain SimPO."
    )
    max_length: int | None = Field(
        None, gt=8, description="Longest prompt + answer in tokens; longer pairs are cut. Default: data.max_seq_length."
    )


class KtoSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of the desirable (chosen) answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of the undesirable (rejected) answers.")
    max_length: int | None = Field(
        None, gt=8, description="Longest prompt + answer in tokens; longer ones are cut. Default: data.max_seq_length."
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


class FsdpSection(Section):
    """PyTorch FSDP2 (fully_shard) through accelerate: parameters, gradients and optimizer state sharded
    across the workers; works with LoRA and QLoRA (the route to QLoRA on models larger than one GPU)."""

    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state in CPU memory.")
    reshard_after_forward: bool = Field(
        True, description="Free each layer's gathered weights after its forward (ZeRO-3-like); false: ZeRO-2-like."
    )


class CheckpointSection(Section):
    every_steps: int = Field(50, gt=0, description="Save a checkpoint (and evaluate) every N optimizer steps.")
    keep_best: int = Field(2, gt=0, description="Keep the best K checkpoints by validation loss.")


class TrainSection(Section):
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]  # Literal over the tuple: one list of names
        "sft",
        description="Training method (TRL trainer): `sft` on prompt/response or chat data; on preference pairs "
        "(data.kind preference, or a chain step's `pairs`): `dpo`, `orpo` (SFT + odds ratio, no reference model), "
        "`simpo` (length-normalised reward margin, no reference model), `kto` (each answer judged alone); `grpo` "
        "on the prompts of prompt/response or chat data with reward functions (train.grpo.rewards).",
    )
    finetuning: Literal["full", "lora", "qlora"] = Field(
        "lora", description="Which weights train: all (`full`), LoRA adapters, or LoRA over a 4-bit base (`qlora`)."
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA settings (finetuning lora/qlora).")
    quantization: QuantSection = Field(default_factory=QuantSection, description="4-bit settings (finetuning qlora).")
    sharding: Literal["auto", "ddp", "deepspeed", "fsdp"] = Field(
        "auto",
        description="How workers share the model: `ddp` (a full copy each), `deepspeed` (ZeRO, `train.deepspeed`), "
        "`fsdp` (PyTorch FSDP2, `train.fsdp`). `auto`: deepspeed when a `deepspeed` section is given, else ddp.",
    )
    deepspeed: DeepSpeedSection | None = Field(None, description="DeepSpeed ZeRO; left out means plain DDP.")
    fsdp: FsdpSection = Field(default_factory=FsdpSection, description="FSDP2 settings (sharding fsdp).")
    attn_implementation: Literal[
        "auto", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager"
    ] = Field(
        "auto",
        description="Attention kernel: `auto` picks the fastest installed on GPU (flash_attention_3 on Hopper with "
        "flash-attn 3, flash_attention_2 with flash-attn, else sdpa) and sdpa on CPU. Packed data needs no "
        "particular kernel (examples are kept apart from their position ids), but only the flash kernels and "
        "`flex_attention` (PyTorch's own, nothing to install; compiled at the first step, ~30 s) skip the attention "
        "between packed examples instead of masking it, which is where packing pays.",
    )
    liger: bool = Field(
        False,
        description="Liger kernels (fused RMSNorm, RoPE, SwiGLU, cross-entropy; Triton, GPU only; the liger-kernel "
        "package): less memory and more tokens/s on GPU.",
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch",
        description="Optimizer: AdamW (torch), or bitsandbytes' 8-bit AdamW (a quarter of the optimizer memory), "
        "`paged_adamw_8bit` also paging its state to CPU memory under pressure (GPU).",
    )
    workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="Workers take a GPU each; `auto`: when the cluster has GPUs."
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker asks for besides its CPUs / GPU (name -> amount), e.g. "
        "{spot_a100: 1} to keep workers on the nodes that declare that resource (`ray start --resources`, a node "
        "type's `resources:` in the cluster config). Placement only: it changes no weights and no fingerprint.",
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
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Training precision; fp16 needs a GPU. bf16 runs as bf16 on GPUs and on CPUs with native "
        "bf16 (AVX-512 BF16 / AMX), and as fp32 on other CPUs, where emulated bf16 is many times slower "
        "(models.compute_precision).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    checkpoint: CheckpointSection = Field(
        default_factory=CheckpointSection, description="Checkpointing and evaluation cadence."
    )
    logging_steps: int = Field(5, gt=0, description="Log train loss, tokens/s and memory every N steps.")
    profile_steps: int = Field(
        0,
        ge=0,
        description="Profile this many optimizer steps with torch.profiler (rank 0, from the first step after the "
        "first logging interval) and write `profile.txt` to the train stage folder: wall vs GPU-busy time per step "
        "and the operators by self time. 0: off. A few steps are enough; profiled steps run slower.",
    )
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["mlflow"],  # type: ignore[arg-type]  # pydantic validates the default
        description="Where per-step metrics go: `mlflow` (the run is tracked in the registry's store when it ends), "
        "`tensorboard` (event files in <train dir>/tensorboard; needs the tensorboard package), `wandb` (Weights & "
        "Biases, offline in <train dir>/wandb unless WANDB_MODE says otherwise; needs the wandb package). Install "
        "both with `pip install 'raytune-app[logging]'`.",
    )
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
    orpo: OrpoSection = Field(default_factory=OrpoSection, description="ORPO settings (method orpo).")
    simpo: SimpoSection = Field(default_factory=SimpoSection, description="SimPO settings (method simpo).")
    kto: KtoSection = Field(default_factory=KtoSection, description="KTO settings (method kto).")
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="GRPO settings (method grpo).")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.warmup, float) and self.warmup >= 1:
            raise ValueError(f"warmup as a fraction must be below 1, got {self.warmup} (write an int for steps)")
        builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(self.worker_resources))
        if builtin:
            raise ValueError(
                f"worker_resources: {builtin} are set by train.workers / use_gpu (and tune.cpus_per_worker); "
                "name only custom resources here"
            )
        bad = sorted(name for name, amount in self.worker_resources.items() if amount <= 0)
        if bad:
            raise ValueError(f"worker_resources: amounts must be above 0 ({bad})")
        if self.finetuning == "qlora" and self.deepspeed is not None and self.deepspeed.stage == 3:
            raise ValueError(
                "QLoRA with DeepSpeed ZeRO-3 is not supported here: 4-bit weights cannot be "
                "partitioned by ZeRO-3 with this bitsandbytes/deepspeed; use stage 2"
            )
        if self.precision == "fp16" and self.use_gpu is False:
            raise ValueError("precision fp16 needs a GPU (use_gpu is false); use fp32 or bf16 on CPU")
        if self.sharding == "fsdp" and self.deepspeed is not None:
            raise ValueError("sharding fsdp and a `deepspeed` section exclude each other; drop one")
        if self.sharding == "ddp" and self.deepspeed is not None:
            raise ValueError("sharding ddp with a `deepspeed` section: set sharding to deepspeed (or auto), or drop it")
        if self.sharding == "fsdp" and self.finetuning == "qlora" and self.quantization.compute_dtype != "bfloat16":
            raise ValueError(
                "QLoRA with FSDP stores the 4-bit weights in the compute dtype so FSDP can shard them; set "
                "train.quantization.compute_dtype: bfloat16"
            )
        if self.liger and self.use_gpu is False:
            raise ValueError("liger kernels run on GPUs (Triton) and use_gpu is false; drop train.liger")
        if self.attention_needs_gpu and self.use_gpu is False:
            raise ValueError(
                f"attn_implementation {self.attn_implementation} needs a GPU and use_gpu is false; use sdpa or auto"
            )
        return self

    @property
    def attention_needs_gpu(self) -> bool:
        """The flash kernels run on GPUs only; flex_attention runs forward on a CPU but has no backward there."""
        return self.attn_implementation.startswith("flash") or self.attn_implementation == "flex_attention"

    @property
    def uses_deepspeed(self) -> bool:
        return self.sharding == "deepspeed" or (self.sharding == "auto" and self.deepspeed is not None)
