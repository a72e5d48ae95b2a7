"""A short end-to-end on the bundled SmolLM2-135M-Instruct: prepare the quickstart data, a few LoRA
steps in a Ray Train worker, the adapter saved and loadable for generation."""

import os

import pytest

from raytune_app import config
from raytune_app.data.prepare import prepare
from raytune_app.train.run import train

pytestmark = pytest.mark.usefixtures("ray_local")
RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")


def test_quickstart_recipe_few_lora_steps_on_smollm2(tmp_path):
    recipe = config.load(RECIPE, [
        f"run.output_dir={tmp_path}", "data.generator.rows=60", "data.max_seq_length=512",
        "train.max_steps=3", "train.batch_size=2", "train.logging_steps=1", "train.checkpoint.every_steps=3",
    ])
    prepare(recipe)
    manifest = train(recipe)
    assert manifest["global_step"] == 3 and manifest["base_model"] == "bundled:smollm2-135m-instruct"
    assert 0 < manifest["final_eval_loss"] < 10

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raytune_app import models

    base = AutoModelForCausalLM.from_pretrained(models.resolve(recipe.model.path))
    tuned = PeftModel.from_pretrained(base, manifest["weights"]).eval()
    tokenizer = models.load_tokenizer(manifest["weights"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Order ORD-123456 arrived damaged."}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in out[0].tolist()
