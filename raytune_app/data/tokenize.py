"""Chat-template rendering and tokenisation with an assistant-only loss mask.

Pure functions over a Hugging Face tokenizer (no Ray). For each example the chat is rendered once
with the tokenizer's template; every assistant turn's character span is found by rendering the
chat up to that turn (with and without the turn), and tokens whose characters fall in a span get
`completion_mask` 1. The output columns are the ones TRL's SFTTrainer takes for pre-tokenised data
(`input_ids`, `completion_mask`), so the trainer does not tokenise again.
"""

from __future__ import annotations

import bisect

from raytune_app.data.rows import RowProblem
from raytune_app.errors import DataError


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **({"tools": tools} if tools else {})
    )


def _check_tools_rendered(text: str, messages: list[dict], tools: list | None) -> None:
    """A template that ignores tool calls or tool specs would train the model on a chat without them."""
    names = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    names += [t.get("function", t).get("name") for t in tools or [] if isinstance(t.get("function", t), dict)]
    missing = sorted({n for n in names if n and n not in text})
    if missing:
        raise RowProblem(
            "template_drops_tools",
            None,
            f"the chat template does not render the tool calls / tools {missing}; set model.chat_template to a "
            "template that renders `tools` and `tool_calls` (the model's own may not support tools)",
        )


def assistant_spans(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the (start, end) character spans of the assistant turns in it."""
    text = render(tokenizer, messages, tools=tools)
    _check_tools_rendered(text, messages, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        # The last turn's rendering is the whole text: one template call fewer per example.
        through = text if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], tools=tools)
        if not (through.startswith(before) and text.startswith(through)):
            # A template that rewrites earlier turns (some strip past reasoning) breaks the span logic.
            raise DataError(
                "the chat template does not render a chat as a prefix of its continuation; set "
                "model.chat_template to a template that does (e.g. ChatML)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Token ids and the character offset where each token starts, without special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: transformers' wrapper would convert every encoding into Python
        # dicts first, which costs as much as the tokenisation itself.
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, [start for start, _ in e.offsets]) for e in encodings]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, [start for start, _ in o]) for ids, o in zip(encoded["input_ids"], encoded["offset_mapping"])]


def tokenize_examples(
    tokenizer, chats: list[list[dict]], max_length: int, truncation: str, tools: list | None = None
) -> list[tuple[list[int] | None, list[int] | None, RowProblem | None]]:
    """(input_ids, completion_mask, problem) per chat; `problem` set means the example is rejected.

    truncation `drop`: longer than max_length is rejected (too_long). `truncate`: the end is cut,
    as long as at least one answer token remains after the prompt.
    """
    rendered: list[tuple[str, list[tuple[int, int]]]] = []
    problems: dict[int, RowProblem] = {}
    for i, (chat, chat_tools) in enumerate(zip(chats, tools or [None] * len(chats))):
        try:
            rendered.append(assistant_spans(tokenizer, chat, chat_tools))
        except RowProblem as problem:  # this example only: its batch-mates go on
            problems[i] = problem
            rendered.append(("", []))
    out: list[tuple[list[int] | None, list[int] | None, RowProblem | None]] = []
    for i, ((_, spans), (ids, starts)) in enumerate(zip(rendered, _encode(tokenizer, [t for t, _ in rendered]))):
        if i in problems:
            out.append((None, None, problems[i]))
            continue
        # Token start offsets only grow, so each span is a contiguous run of tokens found by bisection.
        mask = [0] * len(ids)
        for start, end in spans:
            first, last = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
            mask[first:last] = [1] * (last - first)
        if len(ids) > max_length:
            if truncation == "drop" or not any(mask[:max_length]):
                out.append(
                    (
                        None,
                        None,
                        RowProblem(
                            "too_long",
                            None,
                            f"{len(ids)} tokens, above data.max_seq_length={max_length}"
                            + ("" if truncation == "drop" else " even before the answer starts")
                            + "; raise max_seq_length, or set data.truncation: truncate",
                        ),
                    )
                )
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            out.append(
                (
                    None,
                    None,
                    RowProblem("no_answer_tokens", None, "the rendered chat has no assistant tokens to learn from"),
                )
            )
            continue
        out.append((list(ids), mask, None))
    return out


def preference_lengths(tokenizer, prompts: list[list[dict]], chosen: list[str], rejected: list[str]) -> list[int]:
    """Tokens in the longer of (prompt + chosen, prompt + rejected), as DPO will see them."""
    prompt_texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    lengths = []
    for answers in (chosen, rejected):
        encoded = tokenizer([p + a for p, a in zip(prompt_texts, answers)], add_special_tokens=False)
        lengths.append([len(ids) for ids in encoded["input_ids"]])
    return [max(a, b) for a, b in zip(*lengths)]
