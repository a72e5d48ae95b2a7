"""The vLLM backend's pure parts, without starting an engine: request options and what each backend honours,
the top-k drift estimate, vLLM's stream and errors turned into router events, recipe checks, the shared stop tokens.
The engine itself runs in tests/test_vllm_serve.py and tests/test_vllm_batch.py."""

import json
import math

import pytest

from raytune_app import config, models
from raytune_app.serve import options
from raytune_app.serve.drift import top_k_kl
from raytune_app.serve.protocol import APIError
from raytune_app.serve.vllm_stream import (
    adapter_rank,
    adapter_targets,
    carries_text,
    engine_error,
    lora_slots,
    lora_target_modules,
    merge_logprobs,
    sse_data,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_options_parse_response_format_seed_and_logprobs():
    assert options.parse({}, "chat") == {"response_format": None, "seed": None, "logprobs": False, "top_logprobs": None}
    assert options.parse({"response_format": {"type": "text"}}, "chat")["response_format"] is None
    assert options.parse({"response_format": {"type": "json_object"}}, "chat")["response_format"] == {
        "type": "json_object"
    }
    parsed = options.parse(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}, "seed": 3},
        "chat",
    )
    assert parsed["response_format"]["json_schema"]["schema"] == SCHEMA and parsed["seed"] == 3
    assert options.parse({"logprobs": True, "top_logprobs": 4}, "chat")["top_logprobs"] == 4
    assert options.parse({"logprobs": 3}, "completion")["logprobs"] == 3
    bad = [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}}},
            "response_format.json_schema.schema",
        ),
        ({"seed": "7"}, "seed"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ]
    for body, param in bad:
        with pytest.raises(APIError) as caught:
            options.parse(body, "chat")
        assert caught.value.status == 400 and caught.value.param == param, (body, caught.value.message)


def test_the_transformers_backend_refuses_what_it_cannot_honour():
    constrained = {"response_format": {"type": "json_object"}, "temperature": 0.0}
    for request, param in (
        (constrained, "response_format"),
        ({"logprobs": True, "temperature": 0.0}, "logprobs"),
        ({"logprobs": 2, "temperature": 0.0}, "logprobs"),
        ({"seed": 1, "temperature": 0.7}, "seed"),
    ):
        with pytest.raises(APIError) as caught:
            options.refuse_unsupported(request, "transformers")
        assert caught.value.param == param and caught.value.code == "unsupported_parameter"
        assert param in caught.value.message and "serve.backend: vllm" in caught.value.message
        options.refuse_unsupported(request, "vllm")  # vLLM honours all of them
    options.refuse_unsupported({"seed": 1, "temperature": 0.0, "logprobs": False}, "transformers")  # greedy: a no-op


def test_top_k_kl_is_zero_for_identical_models_and_a_lower_bound_otherwise():
    import numpy as np

    rng = np.random.default_rng(0)
    p_full = rng.dirichlet(np.ones(50) * 0.3, size=6)
    q_full = rng.dirichlet(np.ones(50) * 0.3, size=6)
    exact = float(np.mean([(p * (np.log(p) - np.log(q))).sum() for p, q in zip(p_full, q_full)]))

    def top(dist, k, served):
        keep = set(np.argsort(-dist)[:k]) | {served}
        return {int(t): float(math.log(dist[t])) for t in keep}

    served = [int(np.argmax(p)) for p in p_full]
    same = top_k_kl([top(p, 5, s) for p, s in zip(p_full, served)], [top(p, 5, s) for p, s in zip(p_full, served)])
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["positions"] == 6
    estimates = [
        top_k_kl([top(p, k, s) for p, s in zip(p_full, served)], [top(q, k, s) for q, s in zip(q_full, served)])["kl"]
        for k in (3, 10, 50)
    ]
    assert all(0 < e <= exact + 1e-9 for e in estimates), (estimates, exact)
    assert estimates[-1] == pytest.approx(exact, rel=1e-6)  # k covers the vocabulary: the exact KL
    assert top_k_kl([], []) == {"kl": 0.0, "top1_agreement": 1.0, "positions": 0}


def test_only_pieces_with_generated_tokens_count_as_the_first_words():
    """A stream's first event leaves as soon as a piece holds tokens: vLLM's opening role chunk, its closing
    usage and an error object do not; a chat delta, a completion's text or token ids alone do."""

    def sse(*payloads):
        return "".join(f"data: {json.dumps(p)}\n\n" for p in payloads)

    role = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    assert not carries_text(role)
    assert not carries_text(sse({"choices": [], "usage": {"completion_tokens": 3}}) + "data: [DONE]\n\n")
    assert not carries_text(object())  # an ErrorResponse
    assert carries_text(role + sse({"choices": [{"delta": {"content": "Hi"}, "token_ids": [5]}]}))
    assert carries_text(sse({"choices": [{"text": "Hi", "token_ids": [5]}]}))
    assert carries_text(sse({"choices": [{"delta": {"content": ""}, "token_ids": [7]}]}))  # a token of no text yet


def test_vllm_stream_pieces_become_events():
    chunk = {"choices": [{"delta": {"content": "Hi"}, "token_ids": [5]}], "prompt_token_ids": [1, 2]}
    text = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({'usage': {'prompt_tokens': 2}})}\n\ndata: [DONE]\n\n"
    assert list(sse_data(text)) == [chunk, {"usage": {"prompt_tokens": 2}}]
    chat = merge_logprobs(None, {"content": [{"token": "a", "logprob": -0.1}]})
    chat = merge_logprobs(chat, {"content": [{"token": "b", "logprob": -0.2}]})
    assert [t["token"] for t in chat["content"]] == ["a", "b"]
    legacy = merge_logprobs(None, {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1}]})
    legacy = merge_logprobs(legacy, {"tokens": ["b"], "token_logprobs": [-0.3], "top_logprobs": [{"b": -0.3}]})
    assert legacy["tokens"] == ["a", "b"] and legacy["token_logprobs"] == [-0.1, -0.3]
    assert merge_logprobs(None, None) is None


def test_vllm_errors_map_to_refusals_or_failures():
    refused = engine_error({"code": 400, "message": "Grammar error: look-around is not supported", "type": "x"})
    assert isinstance(refused, options.ModelRequestError) and refused.status == 400
    assert refused.param == "response_format" and "look-around" in refused.message
    failed = engine_error({"code": 500, "message": "engine died"})
    assert isinstance(failed, RuntimeError) and not isinstance(failed, options.ModelRequestError)
    # The refusal crosses Ray's process boundary with its fields (Ray pickles exceptions).
    import pickle

    again = pickle.loads(pickle.dumps(refused))
    assert (again.status, again.code, again.param, again.message) == (
        400,
        "invalid_value",
        "response_format",
        refused.message,
    )


def test_adapter_rank_reads_r_and_rank_pattern(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 32}}))
    assert adapter_rank(str(tmp_path)) == 32


def test_lora_is_served_on_the_decoder_linear_layers_only(tmp_path, tiny_model):
    """vLLM gets the decoder's linear layers as LoRA targets (never the output head, whose LoRA logits path
    kills vLLM 0.32's engine on prompt logprobs in a shared batch), and an adapter that trains anything
    else is named by its modules."""
    served = lora_target_modules(tiny_model)
    assert set(served) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    config = {"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_targets(str(tmp_path)) - set(served) == {"lm_head"}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ".*proj"}))
    assert adapter_targets(str(tmp_path)) == set()  # a regular expression: vLLM matches it itself


def test_a_cpu_engine_keeps_a_spare_lora_slot_for_base_rows():
    """On a CPU the last LoRA slot must stay empty (a base row's index -1 selects it in vLLM 0.32's torch
    kernels); on a GPU the adapters alone."""
    assert lora_slots(3, on_gpu=False) == 4 and lora_slots(3, on_gpu=True) == 3


def test_recipe_checks_for_the_vllm_settings():
    data = {"data": {"generator": {"name": "order_extraction"}}}
    default = config.validate(data)
    assert (
        default.serve.backend == "auto"
        and default.evaluate.backend == "auto"
        and default.serve.vllm.max_lora_rank == 16
    )
    for section, message in (
        ({"serve": {"vllm": {"max_lora_rank": 24}}}, "max_lora_rank"),
        (
            {"evaluate": {"schema_constrained": True, "task": "free_text"}},
            "schema_constrained applies to task structured",
        ),
        (
            {"evaluate": {"schema_constrained": True, "backend": "transformers"}},
            "schema_constrained needs backend vllm",
        ),
        ({"serve": {"backend": "tgi"}}, "serve.backend"),
    ):
        with pytest.raises(config.RecipeError, match=message):
            config.validate(data | section)


def test_auto_backend_is_vllm_wherever_it_is_installed(monkeypatch):
    monkeypatch.setattr(models, "vllm_installed", lambda: True)
    assert models.generation_backend("auto") == "vllm"
    monkeypatch.setattr(models, "vllm_installed", lambda: False)
    assert models.generation_backend("auto") == "transformers"
    assert models.generation_backend("transformers") == "transformers"
    with pytest.raises(ValueError, match="scripts/setup.sh"):
        models.generation_backend("vllm")
    assert models.vllm_dtype("fp16", on_gpu=False) == "float32" and models.vllm_dtype("fp16", on_gpu=True) == "float16"


def test_one_precision_rule_for_every_engine(monkeypatch):
    """bf16 on a CPU only where it is native (emulated it is many times slower), never fp16 on a CPU."""
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert [models.compute_precision(p, on_gpu=False) for p in ("fp32", "bf16", "fp16")] == ["fp32"] * 3
    assert [models.compute_precision(p, on_gpu=True) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.compute_precision("bf16", on_gpu=False) == "bf16" and models.vllm_dtype("bf16", False) == "bfloat16"


def test_a_model_vllm_cannot_run_on_cpu_falls_back_or_is_refused(monkeypatch, tiny_model):
    """The tiny random Llama has 16-dimensional heads, which vLLM's CPU attention has no kernel for: `auto`
    picks transformers for it, `vllm` is refused by name before any engine starts; the bundled model runs."""
    monkeypatch.setattr(models, "vllm_installed", lambda: True)
    assert "head size 16" in models.vllm_cannot_run({"path": tiny_model})
    assert models.generation_backend("auto", {"path": tiny_model}) == "transformers"
    with pytest.raises(ValueError, match="head size 16.*choose backend transformers"):
        models.generation_backend("vllm", {"path": tiny_model})
    assert models.vllm_cannot_run({"path": "bundled:smollm2-135m-instruct"}) is None
    assert models.generation_backend("auto", {"path": "bundled:smollm2-135m-instruct"}) == "vllm"


def test_one_stop_token_helper_for_every_engine(tiny_model):
    tokenizer = models.load_tokenizer(tiny_model)
    stops = models.stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.eos_token_id in stops
    ids = models.chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_backup_that_cannot_honour_the_options_refuses_instead_of_answering():
    """A vLLM primary with a transformers backup: on failover a constrained request gets 503, not free text."""
    from types import SimpleNamespace

    from raytune_app.serve.router import Router
    from raytune_app.serve.stats import Stats

    router = SimpleNamespace(spec={"backup_backend": "transformers"}, stats=Stats({}, export=False))
    unable = Router.func_or_class._backup_unable
    refusal = unable(router, {"response_format": {"type": "json_object"}, "temperature": 0.0}, RuntimeError("down"))
    assert refusal["error"]["status"] == 503
    assert refusal["error"]["body"]["error"]["param"] == "response_format"
    assert unable(router, {"temperature": 0.0, "logprobs": False}, RuntimeError("down")) is None
    assert (
        unable(SimpleNamespace(spec={"backup_backend": "vllm"}, stats=router.stats), {"logprobs": True}, None) is None
    )


def test_completion_logprobs_in_the_chat_shape():
    from raytune_app.serve.vllm_stream import chat_logprobs

    piece = {
        "tokens": ["Hi", "!"],
        "token_logprobs": [-0.1, -0.5],
        "top_logprobs": [{"Hi": -0.1, "Hello": -2.0, "Hey": -3.0}, {"!": -0.5, ".": -1.0}],
        "text_offset": [0, 2],
    }
    shaped = chat_logprobs(piece, 2)["content"]
    assert [t["token"] for t in shaped] == ["Hi", "!"] and shaped[1]["logprob"] == -0.5
    assert [t["token"] for t in shaped[0]["top_logprobs"]] == ["Hi", "Hello"]
    assert shaped[0]["bytes"] == list(b"Hi") and chat_logprobs(None, 2) is None
    assert chat_logprobs(piece, 0)["content"][0]["top_logprobs"] == []


@pytest.mark.slow  # a Ray task that imports torch, transformers and PEFT: ~12 s here
def test_adapters_are_merged_into_copies_of_the_base_for_the_cpu_engines(tmp_path, tiny_model, ray_local):
    """evaluate.adapters merged (the default on a CPU): each adapter becomes a full model folder that gives
    PEFT's logits, the base and non-adapter candidates pass through, and the copies are gone afterwards."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from raytune_app.evaluate import vllm_batch

    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft.save_pretrained(tmp_path / "adapter")
    candidates = [("base", None), ("tuned", str(tmp_path / "adapter"))]
    scratch = tmp_path / "run"
    kept = vllm_batch.Settings(max_new_tokens=4, precision="fp32", merge_adapters=False, scratch_dir=str(scratch))
    with vllm_batch._merged({"path": tiny_model}, candidates, kept) as as_given:
        assert as_given == candidates
    settings = vllm_batch.Settings(max_new_tokens=4, precision="fp32", merge_adapters=True, scratch_dir=str(scratch))
    with vllm_batch._merged({"path": tiny_model}, candidates, settings) as engines:
        assert engines[0] == ("base", None)
        name, folder = engines[1]
        assert name == "tuned" and folder.startswith(str(scratch))
        assert vllm_batch._adapter_folder(folder) is None  # a whole model now: an engine of its own
        assert len(vllm_batch._engines({"path": tiny_model}, engines)) == 2
        ids = torch.tensor([[1, 5, 9, 13, 2]])
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
        with torch.no_grad():
            want = reference.eval()(ids).logits
            got = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
            base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(base, want, atol=1e-3)  # the adapter changes the logits: the check can fail
    assert not any(p.name.startswith(".merged-adapters-") for p in scratch.iterdir())


def test_adapters_auto_merges_on_a_cpu_only_when_the_run_is_large_enough():
    import pyarrow as pa

    from raytune_app.evaluate.run import MERGE_FROM_TOKENS, _merge_adapters
    from raytune_app.evaluate.settings import EvaluateSection

    def rows(n: int, words: int = 0):
        return pa.table({"prompt": [[{"role": "user", "content": "word " * words}]] * n})

    auto = EvaluateSection(max_new_tokens=100)
    enough = -(-MERGE_FROM_TOKENS // 100)
    assert _merge_adapters(auto, rows(enough), use_gpu=False)
    assert not _merge_adapters(auto, rows(enough - 1), use_gpu=False)  # a small run stays in one engine
    assert not _merge_adapters(auto, rows(10 * enough), use_gpu=True)  # a GPU keeps the adapters as LoRA requests
    assert _merge_adapters(EvaluateSection(adapters="merged"), rows(1), use_gpu=True)
    assert not _merge_adapters(EvaluateSection(adapters="lora"), rows(10 * enough), use_gpu=False)
    # Long prompts with short answers (a classification): the prompts' prefill counts too.
    short = EvaluateSection(max_new_tokens=4)
    assert not _merge_adapters(short, rows(20, words=100), use_gpu=False)  # ~125 prompt tokens each
    assert _merge_adapters(short, rows(500, words=100), use_gpu=False)
    assert not _merge_adapters(short, rows(500), use_gpu=False)


def test_a_batch_engine_on_a_cpu_runs_its_model_in_the_engine_process_on_its_whole_cores():
    """ray.data.llm's single-process executor kept on a CPU (V1 multiprocessing off, else vLLM's CPU build spawns a
    worker process and holds a core back), threads = whole cores of the bundle; a GPU engine is left as vLLM sets it."""
    from raytune_app.evaluate import vllm_batch

    model = {"path": "unused"}
    on_cpu = vllm_batch._config("base", [], 100, vllm_batch.Settings(max_new_tokens=8, cpus=1.5, kv_cache_gb=2), model)
    assert on_cpu.runtime_env["env_vars"] == {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
    }
    assert models.vllm_cpu_single_process_env(0.5, 1)["OMP_NUM_THREADS"] == "1"  # never zero threads
    assert models.vllm_cpu_single_process_env(15, 1)["OMP_NUM_THREADS"] == "15"
    on_gpu = vllm_batch._config("base", [], 100, vllm_batch.Settings(max_new_tokens=8, use_gpu=True), model)
    assert not (on_gpu.runtime_env or {}).get("env_vars")
