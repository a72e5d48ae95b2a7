"""`raytune-app export`: adapters merged into standalone weights and written as GGUF, proven exact.

Most tests use an adapter made here with PEFT on the tiny random Llama (its LoRA B matrices randomised, so
the adapter really changes the model): no Ray, seconds. One test exports the adapter a real Ray Train run
trained (the session's toy run) with its lineage, and registers the export in MLflow.
"""

import json
import os

import pytest
import torch

from raytune_app import cli, config, errors
from raytune_app.export.merge import ExportError
from raytune_app.export.run import export

PROMPTS = ["ticket 12: please classify, word 3", '{"status": "ok"}', "order late refund"]


def recipe_for(tmp_path, model_path, **train):
    return config.validate(
        {
            "run": {"name": "exp", "output_dir": str(tmp_path / "runs")},
            "model": {"path": model_path},
            "data": {"generator": {"name": "order_extraction", "rows": 10}},
            "train": {"lora": {"rank": 4}, **train},
        }
    )


def make_adapter(folder, base_path, *, quantized: bool = False, compute="float32", seed=0) -> str:
    """A LoRA adapter over the tiny base whose B matrices are random (a fresh adapter is the identity)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs = {
            "device_map": {"": "cpu"},
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, compute)
            ),
        }
    base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(folder)
    return str(folder)


def logits(model, tokenizer, prompt):
    with torch.no_grad():
        return model(tokenizer(prompt, return_tensors="pt").input_ids).logits.float()


def reference_model(base_path, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


def test_merged_export_equals_base_plus_adapter(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(tmp_path / "adapter", tiny_model)
    recipe = recipe_for(tmp_path, tiny_model)
    lineage = export(recipe, fmt="merged", out=str(tmp_path / "fp32"), adapter=adapter, dtype="fp32")
    assert lineage["merge_check"]["same_greedy_tokens"] and lineage["merge_check"]["max_abs_logit_diff"] < 1e-4
    saved = json.load(open(tmp_path / "fp32" / "lineage.json"))
    assert saved["base_model"] == tiny_model and saved["format"] == "merged" and saved["dtype"] == "fp32"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "fp32" / name).exists(), name
    assert not any((tmp_path / "fp32").glob("adapter_*"))  # standalone: no adapter files

    reference, tokenizer = reference_model(tiny_model, adapter), AutoTokenizer.from_pretrained(tmp_path / "fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for prompt in PROMPTS:
        expected = logits(reference, tokenizer, prompt)
        torch.testing.assert_close(logits(merged, tokenizer, prompt), expected, atol=1e-4, rtol=1e-4)
        assert (logits(base, tokenizer, prompt) - expected).abs().max() > 1e-2  # the adapter does change the model

    export(recipe, fmt="merged", out=str(tmp_path / "bf16"), adapter=adapter, dtype="bf16")
    merged16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged16.dtype == torch.bfloat16
    for prompt in PROMPTS:  # bf16 keeps ~3 significant digits
        torch.testing.assert_close(
            logits(merged16, tokenizer, prompt), logits(reference, tokenizer, prompt), atol=0.05, rtol=0.02
        )


@pytest.mark.parametrize("quantization", ["f32", "q8_0"])
def test_gguf_export_loads_back_and_generates_the_same_tokens(tmp_path, tiny_model, quantization):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(tmp_path / "adapter", tiny_model)
    recipe = recipe_for(tmp_path, tiny_model)
    out = tmp_path / "gguf"
    lineage = export(recipe, fmt="gguf", out=str(out), adapter=adapter, dtype="fp32", quantization=quantization)
    name = os.path.basename(lineage["gguf"]["file"])
    assert (out / name).exists() and not list(out.glob("*.partial"))

    reference, tokenizer = reference_model(tiny_model, adapter), AutoTokenizer.from_pretrained(adapter)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    loaded_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    tolerance = 1e-4 if quantization == "f32" else 0.05
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert loaded_tokenizer(prompt, return_tensors="pt").input_ids.tolist() == ids.tolist()
        torch.testing.assert_close(
            logits(loaded, tokenizer, prompt), logits(reference, tokenizer, prompt), atol=tolerance, rtol=tolerance
        )
        with torch.no_grad():
            want = reference.generate(ids, max_new_tokens=8, do_sample=False)
            got = loaded.generate(ids, max_new_tokens=8, do_sample=False)
        assert got[0, : ids.shape[1] + 4].tolist() == want[0, : ids.shape[1] + 4].tolist()  # the first tokens


def test_qlora_adapter_merges_into_the_dequantised_4bit_base(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytune_app.train.model import four_bit_config
    from raytune_app.train.settings import QuantSection

    quant = {"quant_type": "nf4", "compute_dtype": "float32", "double_quant": True}
    adapter = make_adapter(tmp_path / "adapter", tiny_model, quantized=True)
    recipe = recipe_for(tmp_path, tiny_model, finetuning="qlora", quantization=quant)
    lineage = export(recipe, fmt="merged", out=str(tmp_path / "merged"), adapter=adapter, dtype="fp32")
    assert "de-quantised 4-bit base" in lineage["precision_note"]

    four_bit = AutoModelForCausalLM.from_pretrained(
        tiny_model, device_map={"": "cpu"}, quantization_config=four_bit_config(QuantSection(**quant))
    )
    trained = PeftModel.from_pretrained(four_bit, adapter).eval()  # what QLoRA training ran
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    full_precision = reference_model(tiny_model, adapter)  # the adapter on the original weights
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    for prompt in PROMPTS:
        expected = logits(trained, tokenizer, prompt)
        error = (logits(merged, tokenizer, prompt) - expected).abs().max().item()
        # Merging into the original weights instead would not be the model that was trained.
        wrong_base = (logits(full_precision, tokenizer, prompt) - expected).abs().max().item()
        # bitsandbytes' CPU 4-bit matmul rounds through bf16 where the CPU has it (AVX-512 BF16 / AMX: ~2.5e-3
        # here on logits of ~0.6, a step or two of bf16), exactly fp32 elsewhere (< 1e-3); the wrong base is
        # off by ~0.06-0.08, so the bound still tells the two apart by an order of magnitude.
        assert error < 5e-3 and error < wrong_base / 10, (error, wrong_base)


def test_export_refuses_bad_requests_before_writing(tmp_path, tiny_model):
    adapter = make_adapter(tmp_path / "adapter", tiny_model)
    recipe = recipe_for(tmp_path, tiny_model)
    with pytest.raises(ExportError, match="no finished training run"):
        export(recipe, fmt="merged", out=str(tmp_path / "a"))
    with pytest.raises(ExportError, match="no such folder"):
        export(recipe, fmt="merged", out=str(tmp_path / "a"), adapter=str(tmp_path / "missing"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("earlier output")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(recipe, fmt="merged", out=str(tmp_path / "full"), adapter=adapter)
    assert (tmp_path / "full" / "keep.txt").read_text() == "earlier output"
    with pytest.raises(ExportError, match="quantization"):
        export(recipe, fmt="gguf", out=str(tmp_path / "g"), adapter=adapter, quantization="q4_k_m")
    assert not (tmp_path / "a").exists() and not (tmp_path / "g").exists()
    # The CLI: the same problem, one line, exit 4; a good request, exit 0.
    assert (
        cli.main(
            ["export", "--recipe", _saved(recipe, tmp_path), "--out", str(tmp_path / "full"), "--adapter", adapter]
        )
        == errors.EXIT_BAD_DATA
    )
    assert (
        cli.main(
            [
                "export",
                "--recipe",
                _saved(recipe, tmp_path),
                "--out",
                str(tmp_path / "ok"),
                "--adapter",
                adapter,
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert (tmp_path / "ok" / "model.safetensors").exists()


def _saved(recipe, tmp_path) -> str:
    return config.save_resolved(recipe, tmp_path / "recipe")


@pytest.mark.slow
@pytest.mark.extended
def test_export_of_a_trained_run_carries_its_lineage_and_registers(toy_run, tmp_path):
    from raytune_app.registry import store

    recipe, _ = toy_run
    manifest = json.load(open(os.path.join(recipe.stage_dir("train"), "manifest.json")))
    other_base = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": str(tmp_path)})})
    with pytest.raises(ExportError, match="was trained on"):
        export(other_base, fmt="merged", out=str(tmp_path / "wrong"))

    lineage = export(recipe, fmt="merged", out=str(tmp_path / "merged"), dtype="fp32", register=True)
    assert lineage["train_fingerprint"] == manifest["fingerprint"] and lineage["finetuning"] == "lora"
    assert lineage["merge_check"]["max_abs_logit_diff"] < 1e-4
    registered = lineage["registered_as"]
    shown = store.show(store.tracking_uri(recipe), registered["name"], registered["version"])
    assert registered["name"] == f"{store.model_name(recipe)}-merged"
    assert shown["tags"]["type"] == "merged" and shown["tags"]["train_fingerprint"] == manifest["fingerprint"]
