"""DeepSpeed ZeRO configuration generated from the recipe (no hand-edited JSON needed).

`"auto"` values are filled in by transformers' DeepSpeed integration from the training arguments
(batch size, accumulation, clipping, learning rate, precision), so the recipe stays the one source of
truth. A user's own JSON (`train.deepspeed.config_file`) is used as it is.

Pure Python (no Ray, no DeepSpeed import).
"""

from __future__ import annotations

import json
from pathlib import Path

from raytune_app.errors import DataError, MissingInput
from raytune_app.train.settings import DeepSpeedSection


def deepspeed_config(ds: DeepSpeedSection, use_gpu: bool, base_dir: str | None = None) -> dict:
    """The DeepSpeed config dict for transformers' `TrainingArguments(deepspeed=...)`."""
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_absolute() and base_dir:
            path = Path(base_dir) / path
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingInput(f"train.deepspeed.config_file: {path} not found") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"train.deepspeed.config_file: {path} is not valid JSON ({exc})") from None

    zero: dict = {"stage": ds.stage, "contiguous_gradients": True, "overlap_comm": use_gpu}
    if ds.stage >= 2:
        zero.update(reduce_scatter=True, allgather_partitions=True)
    if ds.stage == 3:
        # Save whole (gathered) weights so the saved adapter/model loads without DeepSpeed.
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold="auto",
            stage3_prefetch_bucket_size="auto",
            reduce_bucket_size="auto",
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        # torch's AdamW: DeepSpeed's fused Adam would be compiled at first use (needs CUDA and a compiler).
        # With optimizer offload DeepSpeed requires its CPU Adam, which it compiles once on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": "auto",
                "betas": "auto",
                "eps": "auto",
                "weight_decay": "auto",
                "torch_adam": not ds.offload_optimizer,
            },
        },
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
