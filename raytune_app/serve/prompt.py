"""Prompt token ids from chat messages or a completion prompt, with message content always read as text.

    chat_ids(tokenizer, [{"role": "user", "content": "hi <|im_end|>"}])   # `<|im_end|>` stays 7 text tokens
    text_ids(tokenizer, "order 12")

A tokenizer turns the strings of its added tokens (`<|im_start|>`, `<|im_end|>`, `<s>`...) into control
tokens wherever they appear, also inside what a client typed, which would let a client close its own turn
and forge a system turn. Here the chat template's own text is tokenised as usual, and each message's
content as plain text (`split_special_tokens=True`): a typed `<|im_end|>` is just characters.

When no content holds an added token's string (nearly always), this is exactly the usual tokenisation of
the rendered template. Otherwise the template is rendered with a placeholder per message, and the
pieces between placeholders are tokenised apart from the contents; a template that does not pass the
placeholders through unchanged (it rewrites content) gets a PromptError instead (400: refused, never a
forged turn). Template errors (roles that must alternate...) are PromptErrors too. Used by the ingress
(prompt length, before any model) and the LLM replicas (generation): both count the same tokens. No Ray.
"""

from __future__ import annotations

import uuid


class PromptError(ValueError):
    """Messages or a prompt the model cannot take (a template error, too long...): a 400 for the client."""


def control_strings(tokenizer) -> list[str]:
    """Strings the tokenizer turns into single added tokens when they appear in text."""
    cached = getattr(tokenizer, "_raytune_control_strings", None)
    if cached is None:
        cached = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.content}, key=len)
        try:
            tokenizer._raytune_control_strings = cached
        except AttributeError:  # a tokenizer that refuses attributes: recomputed each time (cheap)
            pass
    return cached


def holds_control(tokenizer, text: str) -> str | None:
    """The first added-token string found in `text`, or None."""
    return next((s for s in control_strings(tokenizer) if s in text), None)


def _render(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, a template's raise_exception(...), a missing template
        reason = str(exc).strip().splitlines()
        raise PromptError(
            f"the model's chat template refused these messages ({type(exc).__name__}: "
            f"{reason[-1][:200] if reason else 'no reason given'})"
        ) from None


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered by the chat template with a generation prompt; content as text."""
    forged = [i for i, m in enumerate(messages) if holds_control(tokenizer, m["content"])]
    if not forged:
        return tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    marks = [f"RAYTUNEMSG{uuid.uuid4().hex}" for _ in messages]
    rendered = _render(tokenizer, [m | {"content": mark} for m, mark in zip(messages, marks)])
    ids: list[int] = []
    rest = rendered
    for index, mark in enumerate(marks):
        if rendered.count(mark) != 1 or rest.find(mark) < 0:
            found = holds_control(tokenizer, messages[forged[0]]["content"])
            raise PromptError(
                f"messages[{forged[0]}].content holds {found!r}, a control token of this model, and its chat "
                "template cannot take it as plain text; remove it"
            )
        before, rest = rest.split(mark, 1)
        ids += tokenizer(before, add_special_tokens=False)["input_ids"]
        ids += tokenizer(messages[index]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + tokenizer(rest, add_special_tokens=False)["input_ids"]


def text_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a completion prompt (with the tokenizer's BOS where it adds one); the prompt as text."""
    split = holds_control(tokenizer, prompt) is not None
    return tokenizer(prompt, add_special_tokens=True, split_special_tokens=split)["input_ids"]


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes one token stands for (its vocabulary string's bytes; byte-level
    and SentencePiece vocabularies spell a byte or a space with a longer character, so this over-counts,
    which keeps `len(text.encode()) / max_token_bytes` a safe lower bound on a text's token count)."""
    cached = getattr(tokenizer, "_raytune_max_token_bytes", None)
    if cached is None:
        cached = max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()), default=1)
        cached = max(1, cached)
        try:
            tokenizer._raytune_max_token_bytes = cached
        except AttributeError:
            pass
    return cached
