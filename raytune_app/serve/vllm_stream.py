"""vLLM's OpenAI stream as the router's events: pure functions over its server-sent-event strings and error
objects, and the adapter facts the vLLM deployment checks (raytune_app/serve/vllm_server.py uses them).
No Ray, no vLLM import: unit-tested on their own (tests/test_vllm_parts.py).
"""

from __future__ import annotations

import functools
import json
import os

from raytune_app.serve.options import ModelRequestError


def adapter_rank(folder: str) -> int:
    """The largest LoRA rank in a PEFT adapter folder (its `r`, or a larger per-module `rank_pattern`)."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    return max([int(config.get("r", 0)), *map(int, (config.get("rank_pattern") or {}).values())])


def adapter_targets(folder: str) -> set[str]:
    """The module names a PEFT adapter folder trains (`target_modules`, names or one regular expression:
    a regular expression is matched by vLLM itself, so it comes back as an empty set), plus any
    `modules_to_save` (whole modules, e.g. an lm_head, which vLLM serves as LoRA targets too)."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    targets = config.get("target_modules") or []
    names = set() if isinstance(targets, str) else {t.split(".")[-1] for t in targets}
    return names | {m.split(".")[-1] for m in config.get("modules_to_save") or []}


@functools.cache
def lora_target_modules(model_path: str, trust_remote_code: bool = False) -> list[str]:
    """The linear layers of a causal LM's decoder (PEFT's `all-linear`: every `nn.Linear` but the output
    head), read from its config on the meta device (no weights are loaded).

    vLLM gets these as `lora_target_modules`. Left to itself it also wraps the output head's logits for
    LoRA, and vLLM 0.32's LoRA logits path indexes prompt positions by request (vllm-project/vllm#16668):
    a request with prompt logprobs (the drift monitor's) in a batch with another request kills the
    engine (`einsum(): subscript b has size 2 ... size 37`). Adapters trained here never touch the head."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    return sorted(
        {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def lora_slots(adapters: int, on_gpu: bool) -> int:
    """vLLM's `max_loras` (and `max_cpu_loras`) for an engine that serves `adapters` LoRA adapters.

    On a GPU, `adapters` (vLLM swaps adapters in and out of its slots). On a CPU, one slot more than all of
    them: vLLM 0.32's CPU LoRA kernels (lora/ops/torch_ops) pick each row's LoRA weights by slot index, and a
    row without an adapter has index -1, which in torch indexing is the *last* slot. With every slot filled
    (and vLLM keeps adapters in their slots until it needs the room), a request for the base model that
    shares a batch with adapter requests is answered by the adapter in the last slot (measured here: 5 of 6
    base replies in a mixed batch were the adapter's). Slots fill first-free, so with a slot for every
    adapter plus one, the last stays empty (zeros) and base rows get the base model."""
    return adapters if on_gpu else adapters + 1


def sse_data(item: str):
    """The JSON payloads in a piece of vLLM's server-sent-event stream."""
    for block in item.split("\n\n"):
        block = block.strip()
        if block.startswith("data:"):
            data = block[5:].strip()
            if data and data != "[DONE]":
                yield json.loads(data)


def carries_text(item) -> bool:
    """Whether a piece of vLLM's stream holds generated tokens (not only the opening role chunk, an error or
    the closing usage)."""
    if not isinstance(item, str):
        return False
    return any(
        choice.get("token_ids") or (choice.get("delta") or {}).get("content") or choice.get("text")
        for data in sse_data(item)
        for choice in data.get("choices") or []
    )


def engine_error(error: dict) -> Exception:
    """A vLLM error object as the exception the router acts on: 4xx -> refused (no failover), 5xx -> failed."""
    status = int(error.get("code") or 500)
    message = str(error.get("message") or error)
    if status >= 500:
        return RuntimeError(f"vLLM failed: {message}")
    param = error.get("param")
    if param is None and any(w in message.lower() for w in ("schema", "grammar", "json", "response_format")):
        param = "response_format"
    return ModelRequestError(status, message, "invalid_value" if status == 400 else "invalid_request", param)


def merge_logprobs(total: dict | None, piece: dict | None) -> dict | None:
    """Concatenate streamed logprobs pieces: chat ({"content": [...]}) or completions (parallel lists)."""
    if piece is None:
        return total
    if total is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in piece.items()}
    for key, value in piece.items():
        if isinstance(value, list):
            total.setdefault(key, []).extend(value)
    return total


def chat_logprobs(piece: dict | None, top: int) -> dict | None:
    """Completions-style logprobs (parallel lists: tokens, token_logprobs, top_logprobs) in the chat shape
    ({"content": [{token, logprob, bytes, top_logprobs: [...]}]}), keeping the `top` most likely."""
    if piece is None:
        return None
    content = []
    tops = piece.get("top_logprobs") or [None] * len(piece.get("tokens") or [])
    for token, logprob, alternatives in zip(piece.get("tokens") or [], piece.get("token_logprobs") or [], tops):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked],
            }
        )
    return {"content": content}
