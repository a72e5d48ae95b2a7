"""`raytune-app export`: a trained adapter as standalone weights (merged safetensors) or one GGUF file.

    raytune-app export --recipe R --format merged --out exports/merged [--dtype bf16]
    raytune-app export --recipe R --adapter models:/quickstart@champion --format gguf --quantization q8_0 --out DIR
    raytune-app export --recipe R --adapter runs/x/train/adapter --format merged --out DIR --register

The adapter is the recipe's trained one by default (its train manifest gives the lineage), or a folder,
or a registered version (`models:/name/3`, `models:/name@champion`: the version's tags give the lineage).
Before any weights are written the merge is checked: the merged model's logits on fixed prompts are
compared with base + adapter's (unmerged), and the largest difference is recorded in `lineage.json`
beside the weights, with the registry version, the training fingerprint, the base model and the dtype.
An adapter trained on another base than the recipe's `model.path` is refused.

Output folders are written under a temporary name and renamed into place; an existing output folder is
refused unless `--force`. With `--register` the export becomes a version of the registered model
`<name>-merged` (tag `type: merged`, `parent_version` the adapter's version), separate from the adapter
versions that serving loads. No Ray here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

from raytune_app import console, storage
from raytune_app.config import Recipe
from raytune_app.export.merge import ExportError, merged_model

FORMATS = ("merged", "gguf")
# Fixed prompts for the merge check: short, mixed text, code and digits.
CHECK_PROMPTS = ["Extract the order id from: order 1234 arrived late.", "def add(a, b):\n    return", "2 + 2 ="]


def _adapter_and_lineage(recipe: Recipe, adapter: str | None) -> tuple[str, dict]:
    """(local adapter folder, lineage) for the --adapter given (or the recipe's own trained adapter)."""
    from raytune_app.registry import store

    if adapter and adapter.startswith("models:/"):
        version = store.version_of(recipe, adapter)
        tags = dict(version.tags)
        lineage = {
            "adapter": adapter,
            "registered_model": version.name,
            "registered_version": str(version.version),
            "train_fingerprint": tags.get("train_fingerprint"),
            "base_model": tags.get("base_model"),
            "finetuning": tags.get("finetuning", "lora"),
            "method": tags.get("method"),
            "data_fingerprint": tags.get("data_fingerprint"),
        }
        return store.download(recipe, f"models:/{version.name}/{version.version}"), lineage
    train_dir = storage.absolute(recipe.stage_dir("train"))
    own = storage.read_json(storage.join(train_dir, "manifest.json"))
    if adapter is None and own is None:
        raise ExportError(f"no finished training run in {train_dir}; run `raytune-app train` first or pass --adapter")
    folder = storage.absolute(adapter) if adapter else own["weights"]
    if not storage.exists(folder):
        raise ExportError(f"--adapter {folder}: no such folder")
    # A folder written by a training run has that run's manifest beside it.
    manifest = storage.read_json(storage.join(folder.rstrip("/").rsplit("/", 1)[0], "manifest.json"))
    lineage = {"adapter": folder, "registered_model": None, "registered_version": None}
    if manifest is not None and manifest.get("weights", "").rstrip("/") == folder.rstrip("/"):
        lineage |= {key: manifest.get(key) for key in ("base_model", "finetuning", "method", "data_fingerprint")}
        lineage["train_fingerprint"] = manifest.get("fingerprint")
    else:  # a folder of unknown origin: the recipe says how it was trained
        lineage |= {"train_fingerprint": None, "base_model": recipe.model.path, "finetuning": recipe.train.finetuning}
    return storage.local_dir(folder), lineage


def _merge_check(reference, merged, tokenizer) -> dict:
    """Largest |logit difference| between base + adapter (unmerged) and the merged model on CHECK_PROMPTS."""
    import torch

    worst, same_argmax = 0.0, True
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            expected = reference(ids).logits.float()
            got = merged(ids).logits.float()
            worst = max(worst, (expected - got).abs().max().item())
            same_argmax &= bool((expected.argmax(-1) == got.argmax(-1)).all())
    return {"max_abs_logit_diff": round(worst, 6), "same_greedy_tokens": same_argmax, "prompts": len(CHECK_PROMPTS)}


def export(
    recipe: Recipe,
    *,
    fmt: str,
    out: str,
    adapter: str | None = None,
    dtype: str = "bf16",
    quantization: str = "q8_0",
    register: bool = False,
    force: bool = False,
) -> dict:
    """Export an adapter merged into its base (`fmt` merged) or as a GGUF file (`fmt` gguf); returns the lineage."""
    from raytune_app.export.gguf_file import QUANTIZATIONS, write_gguf

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose merged or gguf")
    if fmt == "gguf" and quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not force:
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --force to replace it")
    local, lineage = _adapter_and_lineage(recipe, adapter)
    if lineage.get("base_model") and lineage["base_model"] != recipe.model.path:
        raise ExportError(
            f"the adapter was trained on {lineage['base_model']}, the recipe's model.path is {recipe.model.path}; "
            "merging it into another base gives a broken model: use the recipe it was trained with"
        )
    finetuning = lineage.get("finetuning") or "lora"
    console.logger("export").info(f"merging {lineage['adapter']} ({finetuning}) into {recipe.model.path} ({dtype})")
    reference, merged, tokenizer = merged_model(
        recipe.model,
        local,
        finetuning=finetuning,
        dtype=dtype,
        quantization=recipe.train.quantization,
        keep_reference=True,
    )
    check = _merge_check(reference, merged, tokenizer)
    del reference
    print(
        f"[export] merge check: max |logit diff| {check['max_abs_logit_diff']:.2e} vs base + adapter "
        f"on {check['prompts']} prompts; same greedy tokens: {check['same_greedy_tokens']}",
        flush=True,
    )

    staging = f"{out}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    lineage |= {
        "format": fmt,
        "dtype": dtype,
        "merge_check": check,
        "precision_note": (
            "QLoRA: merged into the de-quantised 4-bit base (bitsandbytes "
            f"{recipe.train.quantization.quant_type}, compute dtype {recipe.train.quantization.compute_dtype})"
            if finetuning == "qlora"
            else "LoRA merged in float32, then cast once to the export dtype"
        ),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        if fmt == "merged":
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            merged.generation_config.save_pretrained(staging)
        else:
            name = f"{recipe.run.name}-{quantization}.gguf"
            lineage["gguf"] = write_gguf(
                merged,
                tokenizer,
                os.path.join(staging, name),
                quantization,
                name=f"{recipe.run.name} (raytune-app export)",
            )
            lineage["gguf"]["file"] = os.path.join(out, name)
        with open(os.path.join(staging, "lineage.json"), "w") as handle:
            json.dump(lineage, handle, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.logger("export").info(f"{fmt} written to {out}")
    if register:
        from raytune_app.registry import store

        lineage["registered_as"] = store.register_export(recipe, out, lineage)
        with open(os.path.join(out, "lineage.json"), "w") as handle:
            json.dump(lineage, handle, indent=2)
        print(
            f"[export] registered models:/{lineage['registered_as']['name']}/{lineage['registered_as']['version']}",
            flush=True,
        )
    return lineage
