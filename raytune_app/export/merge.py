"""Merging a LoRA adapter into its base: standalone weights that need neither PEFT nor the adapter.

    model, tokenizer = merged_model(recipe.model, adapter_dir, finetuning="lora", dtype="bf16")

A LoRA adapter trained on a full-precision base is merged in float32 (W + B·A·alpha/r, PEFT's
`merge_and_unload`) and only then cast to the chosen dtype, so the one rounding is the final cast.

A QLoRA adapter learnt its update against the 4-bit base, not the original weights: merging it into the
original weights would pair it with a base it never saw. So the base is quantised exactly as training
did (the recipe's `train.quantization`), de-quantised back to dense weights (transformers'
`dequantize()` of a bitsandbytes model: the nf4 values times their block scales, in the compute dtype),
and the adapter is merged into those. The merged model reproduces base-4bit + adapter up to the
compute dtype's rounding (bfloat16 by default), which is the precision stated in the lineage.

No Ray here; runs on CPU or GPU.
"""

from __future__ import annotations

import torch

from raytune_app import models
from raytune_app.config import ModelSection
from raytune_app.errors import DataError
from raytune_app.train.model import four_bit_config
from raytune_app.train.settings import QuantSection

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(DataError):
    """An export that cannot be done; the message says why and what to do."""


def _dense_base(model: ModelSection, finetuning: str, quantization: QuantSection):
    from transformers import AutoModelForCausalLM

    path = models.resolve(model.path)
    if finetuning != "qlora":
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=model.trust_remote_code
        )
    dense = _quantized_base(model, quantization).dequantize()
    return dense.to(device="cpu", dtype=torch.float32)


def _quantized_base(model: ModelSection, quantization: QuantSection):
    """The base quantised to 4 bits exactly as QLoRA training loads it (raytune_app/train/model.py)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        models.resolve(model.path),
        trust_remote_code=model.trust_remote_code,
        device_map={"": "cuda" if torch.cuda.is_available() else "cpu"},
        quantization_config=four_bit_config(quantization),
    )


def merged_model(
    model: ModelSection,
    weights_dir: str,
    *,
    finetuning: str,
    dtype: str,
    quantization: QuantSection | None = None,
    keep_reference: bool = False,
):
    """(reference, merged model in `dtype`, tokenizer) for weights trained with `finetuning` (lora / qlora /
    full). `reference` is base + adapter as trained, unmerged (with `keep_reference`; else None): the
    4-bit base for QLoRA, float32 otherwise. Full fine-tuning weights are loaded as they are."""
    import copy
    import os

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    has_tokenizer = os.path.exists(os.path.join(weights_dir, "tokenizer_config.json"))
    tokenizer = models.load_tokenizer(
        weights_dir if has_tokenizer else model.path,
        None if has_tokenizer else model.tokenizer,
        model.chat_template,
        model.trust_remote_code,
    )
    if finetuning == "full":
        merged = AutoModelForCausalLM.from_pretrained(
            weights_dir, dtype=torch.float32, trust_remote_code=model.trust_remote_code
        )
        reference = copy.deepcopy(merged) if keep_reference else None
    else:
        if not os.path.exists(os.path.join(weights_dir, "adapter_config.json")):
            raise ExportError(
                f"{weights_dir} holds no LoRA adapter (adapter_config.json is missing); for full fine-tuning "
                "point --adapter at the run's model/ folder"
            )
        quantization = quantization or QuantSection()
        reference = None
        if keep_reference:
            # QLoRA's reference is the 4-bit base the adapter trained against; LoRA's the float32 base.
            reference_base = (
                _quantized_base(model, quantization)
                if finetuning == "qlora"
                else _dense_base(model, "lora", quantization)
            )
            reference = PeftModel.from_pretrained(reference_base, weights_dir).eval()
        base = _dense_base(model, finetuning, quantization)
        merged = PeftModel.from_pretrained(base, weights_dir).merge_and_unload()
    merged = merged.to(EXPORT_DTYPES[dtype]).eval()
    # The merged model generates as the tuned one does: the KV cache is back on (training turns it off).
    merged.config.use_cache = True
    return reference, merged, tokenizer
