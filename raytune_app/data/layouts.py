"""Row layouts of common fine-tuning data sets, turned into chat messages (pure functions, no Ray).

    layout = detect(first_row)                     # "alpaca", "sharegpt", "openai" or "columns"
    messages, tools = to_messages(record, layout)  # [{role, content, tool_calls?, tool_call_id?}], tools or None

- `columns`: the recipe's `data.columns` name the prompt / response (or messages, or preference) fields.
- `alpaca`: `instruction`, optional `input` (appended to the instruction after a blank line), `output`;
  optional `system` and `history` ([[question, answer], ...] turns before this one).
- `sharegpt`: `conversations`: [{from, value}], `from` one of human/user, gpt/assistant/model,
  system, function_call (an assistant's tool call: value is JSON {name, arguments}), observation/tool
  (a tool's result); optional `system` and `tools` (a JSON list of function specs, or a JSON string of one).
- `openai`: `messages` as the OpenAI chat API takes them, including assistant `tool_calls`
  ([{id, type: function, function: {name, arguments}}]) and `tool` messages with `tool_call_id`;
  optional `tools` (the function specs). Plain role/content chats are this layout too.

Messages come out in one shape whatever the layout; `rows.check_messages` validates them, so every
layout's mistakes are reported the same way (file, line, field).
"""

from __future__ import annotations

import json
from typing import Any

from raytune_app.data.problems import RowProblem

LAYOUTS = ("columns", "alpaca", "sharegpt", "openai")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


def detect(record: Any) -> str:
    """The layout a record looks like (used on each source's first row when `format` is auto)."""
    if not isinstance(record, dict):
        return "columns"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if isinstance(record.get("messages"), list):
        return "openai"
    return "columns"


def _text(record: dict, field: str, what: str, required: bool = True) -> str | None:
    value = record.get(field)
    if value is None:
        if required:
            raise RowProblem("missing_field", field, f"no field `{field}` ({what})")
        return None
    if not isinstance(value, str):
        raise RowProblem("wrong_type", field, f"`{field}` must be a string ({what}), got {type(value).__name__}")
    return value


def _tools(record: dict) -> list | None:
    value = record.get("tools")
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowProblem(
                "wrong_type", "tools", "`tools` is a string that is not JSON (a list of function specs)"
            ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowProblem(
            "wrong_type", "tools", "`tools` must be a list of function specs ({name, description, parameters})"
        )
    return value


def alpaca(record: dict) -> list[dict]:
    instruction = _text(record, "instruction", "the alpaca instruction")
    extra = _text(record, "input", "the alpaca input", required=False)
    output = _text(record, "output", "the alpaca output")
    messages = []
    system = _text(record, "system", "the system prompt", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
        raise RowProblem("wrong_type", "history", "`history` must be a list of [question, answer] pairs")
    for i, (question, answer) in enumerate(history):
        if not isinstance(question, str) or not isinstance(answer, str):
            raise RowProblem("wrong_type", f"history[{i}]", "each history turn must be [question, answer] strings")
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt = instruction if not extra else f"{instruction}\n\n{extra}"
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _function_call(value: str, where: str) -> dict:
    try:
        call = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        raise RowProblem("bad_messages", where, "a function_call turn must hold JSON {name, arguments}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RowProblem("bad_messages", where, "a function_call turn must hold JSON {name, arguments}")
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def sharegpt(record: dict) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("wrong_type", "conversations", "`conversations` must be a non-empty list of {from, value}")
    messages: list[dict] = []
    system = _text(record, "system", "the system prompt", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in SHAREGPT_ROLES
            or not isinstance(turn.get("value"), str)
        ):
            known = ", ".join(sorted(SHAREGPT_ROLES))
            raise RowProblem(
                "bad_messages", where, f"turn {i} must be {{from: {known}; value: string}}, got {str(turn)[:80]}"
            )
        if turn["from"] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": [_function_call(turn["value"], where)]})
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def openai(record: dict, field: str = "messages") -> list[dict]:
    value = record.get(field)
    if isinstance(value, str):  # CSV cells and some exports hold the chat as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowProblem("wrong_type", field, f"`{field}` is a string that is not JSON") from None
    if not isinstance(value, list):
        raise RowProblem(
            "missing_field" if value is None else "wrong_type", field, f"`{field}` must be a list of chat messages"
        )
    return value


def to_messages(record: Any, layout: str, messages_field: str = "messages") -> tuple[list, list | None]:
    """(messages, tools) of one record in `layout` (alpaca, sharegpt or openai)."""
    if not isinstance(record, dict):
        raise RowProblem("not_an_object", None, f"a row must be a JSON object, got {type(record).__name__}")
    if layout == "alpaca":
        return alpaca(record), None
    if layout == "sharegpt":
        return sharegpt(record), _tools(record)
    if layout == "openai":
        return openai(record, messages_field), _tools(record)
    raise ValueError(f"unknown layout {layout!r}")
