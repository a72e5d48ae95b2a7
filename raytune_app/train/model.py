"""Loading the model to train: full weights, LoRA adapters, or LoRA over a 4-bit (QLoRA) base.

One explicit branch per `train.finetuning` value. A parent adapter (the previous stage of a chain, or
an adapter to continue) is loaded trainable on top of the base instead of a fresh one.

No Ray here: runs inside each Ray Train worker, and in tests directly.
"""

from __future__ import annotations

import torch

from raytune_app import models
from raytune_app.config import ModelSection
from raytune_app.train.settings import QuantSection, TrainSection

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_config(train: TrainSection):
    """PEFT's LoraConfig from the recipe's `train.lora` (the one place its fields reach PEFT)."""
    from peft import LoraConfig

    return LoraConfig(
        r=train.lora.rank,
        lora_alpha=train.lora.effective_alpha,
        lora_dropout=train.lora.dropout,
        target_modules=train.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def four_bit_config(quant: QuantSection, fsdp: bool = False):
    """bitsandbytes 4-bit settings of `train.quantization` (QLoRA training, and export's de-quantised base)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[quant.compute_dtype],
        **({"bnb_4bit_quant_storage": COMPUTE_DTYPES[quant.compute_dtype]} if fsdp else {}),
    )


def quantization_config(train: TrainSection):
    """bitsandbytes' 4-bit config from the recipe's `train.quantization` (finetuning qlora; under FSDP the
    4-bit weights are stored in the compute dtype, so FSDP can flatten and shard them)."""
    return four_bit_config(train.quantization, fsdp=train.sharding == "fsdp")


def attention_kernel(requested: str, on_gpu: bool) -> str:
    """The attention implementation to load the model with: `auto` is the fastest one installed (flash-attn 3 on
    Hopper, flash-attn 2, else sdpa) on a GPU, and sdpa on a CPU."""
    import importlib.util

    if requested != "auto":
        return requested
    if not on_gpu:
        return "sdpa"
    hopper = torch.cuda.get_device_capability()[0] >= 9
    if hopper and importlib.util.find_spec("flash_attn_interface") is not None:
        return "flash_attention_3"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def choose_sdpa_backends(kernel: str, on_gpu: bool) -> None:
    """Training with sdpa on a GPU: PyTorch's flash and memory-efficient kernels, not cuDNN's.

    Why: cuDNN's attention builds an execution plan for every new sequence shape, on the host. Padded batches
    change shape at nearly every step, and on an H200 (BENCHMARKS.md, "GPU path") each layer's forward and
    backward then spent 17 / 25 ms building plans while its kernels ran for under 0.1 ms: the GPU was busy 3% of
    a 0.87 s step. PyTorch's own kernels need no plan. Process-wide, which is right inside a training worker.
    """
    if on_gpu and kernel == "sdpa":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_for_training(
    model: ModelSection, train: TrainSection, device: torch.device, parent_adapter: str | None = None
):
    """The model, ready for a trainer: trainable parameters set, cache off."""
    from transformers import AutoModelForCausalLM

    path = models.resolve(model.path)
    on_gpu = device.type == "cuda"
    kernel = attention_kernel(train.attn_implementation, on_gpu)
    choose_sdpa_backends(kernel, on_gpu)
    kwargs = {
        "dtype": DTYPES[models.compute_precision(train.precision, on_gpu)],
        "trust_remote_code": model.trust_remote_code,
        "attn_implementation": kernel,
    }

    if train.finetuning == "full":
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif train.finetuning == "lora":
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif train.finetuning == "qlora":
        from peft import prepare_model_for_kbit_training

        kwargs["quantization_config"] = quantization_config(train)
        kwargs["device_map"] = {"": device}
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=train.gradient_checkpointing)
    else:
        raise ValueError(f"unknown train.finetuning {train.finetuning!r}")

    if train.finetuning in ("lora", "qlora"):
        from peft import PeftModel, get_peft_model

        if parent_adapter:
            loaded = PeftModel.from_pretrained(loaded, parent_adapter, is_trainable=True)
        else:
            loaded = get_peft_model(loaded, lora_config(train))
    # Training never reuses a KV cache, and with one transformers would not detect packed sequences
    # from their restarting position ids (attention would leak between packed examples).
    loaded.config.use_cache = False
    return loaded


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
