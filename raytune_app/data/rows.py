"""Row-level rules of the prepare stage: parse, validate, normalise, hash and split one source row.

Pure functions (no Ray): `prepare.py` maps them over Ray Data batches, and tests call them directly.
A row either becomes an *example* (normalised, hashed, assigned a split) or a *rejection* with a
reason code, the offending field and a message that says what to do.

Example shapes, by `data.kind`:
- prompt_response / chat: {"messages": [{"role", "content"}, ...]} ending with the assistant turn;
- preference: {"prompt": [messages...], "chosen": str, "rejected": str}.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

from raytune_app.data import layouts
from raytune_app.data.problems import RowProblem  # noqa: F401  (part of this module's API)

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RowSpec:
    """What the rules need from the recipe's data section, as plain values (cheap to ship to workers)."""

    kind: str
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str | None = None
    system_prompt: str | None = None
    keep_columns: tuple[str, ...] = ()
    min_prompt_chars: int = 1
    max_prompt_chars: int = 20_000
    min_response_chars: int = 1
    max_response_chars: int = 20_000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_salt: str = ""
    # Row layout per source file (raytune_app/data/layouts.py): ((file, layout), ...); files not listed: columns.
    layouts: tuple[tuple[str, str], ...] = ()

    def layout_of(self, source_file: str) -> str:
        return dict(self.layouts).get(source_file, "columns")

    @classmethod
    def from_recipe(cls, data) -> RowSpec:
        """Built from a `config.DataSection`."""
        return cls(
            kind=data.kind,
            prompt=data.column_for("prompt"),
            response=data.column_for("response"),
            messages=data.column_for("messages"),
            chosen=data.column_for("chosen"),
            rejected=data.column_for("rejected"),
            system=data.columns.system,
            system_prompt=data.system_prompt,
            keep_columns=tuple(data.keep_columns),
            min_prompt_chars=data.filters.min_prompt_chars,
            max_prompt_chars=data.filters.max_prompt_chars,
            min_response_chars=data.filters.min_response_chars,
            max_response_chars=data.filters.max_response_chars,
            val_fraction=data.split.val,
            test_fraction=data.split.test,
            split_salt=data.split.salt,
        )


def normalise_text(text: str) -> str:
    """Unicode NFC, LF line ends, no trailing spaces on lines, no blank edges.

    Inner whitespace is kept: it carries meaning in code and tables. Two rows that differ only in
    what this removes are the same example (and dedupe as such).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def parse_json_line(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RowProblem(
            "malformed_json", None, f"not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
        ) from None


def _text_field(record: dict, column: str, role: str) -> str:
    if column not in record:
        present = ", ".join(sorted(record)[:8]) or "none"
        raise RowProblem(
            "missing_field",
            column,
            f"no field `{column}` (needed as the {role}; the row has: {present}); map another column with "
            f"data.columns.{role}",
        )
    value = record[column]
    if value is None:
        raise RowProblem("null_field", column, f"`{column}` is null; the {role} must be text")
    if not isinstance(value, str):
        raise RowProblem("wrong_type", column, f"`{column}` must be a string (the {role}), got {type(value).__name__}")
    value = normalise_text(value)
    if not value:
        raise RowProblem("empty_field", column, f"`{column}` is empty; the {role} must have text")
    return value


def _messages_field(record: dict, column: str) -> list[dict]:
    if column not in record:
        raise RowProblem(
            "missing_field",
            column,
            f"no field `{column}` (a list of {{role, content}} messages); map it with data.columns.messages",
        )
    value = record[column]
    if isinstance(value, str):  # CSV cells and some exports hold the chat as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowProblem(
                "wrong_type",
                column,
                f"`{column}` must be a list of {{role, content}} messages, got a string that is not JSON",
            ) from None
    return check_messages(value, column)


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool calls as [{type: function, function: {name, arguments: object}}, ...]."""
    if not isinstance(calls, list) or not calls:
        raise RowProblem(
            "bad_messages", where, "tool_calls must be a non-empty list of {type, function: {name, arguments}}"
        )
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowProblem("bad_messages", f"{where}[{j}]", "a tool call needs function: {name, arguments}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # the OpenAI API sends arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise RowProblem("bad_messages", f"{where}[{j}]", "tool call arguments are not valid JSON") from None
        if not isinstance(arguments, dict):
            raise RowProblem("bad_messages", f"{where}[{j}]", "tool call arguments must be a JSON object")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def check_messages(value: Any, column: str) -> list[dict]:
    """Validate and normalise a chat: roles, text content, tool calls; the last turn is the assistant's."""
    if not isinstance(value, list) or not value:
        raise RowProblem(
            "wrong_type",
            column,
            f"`{column}` must be a non-empty list of {{role, content}} messages, got {type(value).__name__}",
        )
    messages = []
    for i, message in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RowProblem(
                "bad_messages",
                where,
                f"message {i} must be {{role: system|user|assistant|tool, content: string}}, got {str(message)[:80]}",
            )
        calls = message.get("tool_calls") if message["role"] == "assistant" else None
        content = message.get("content")
        if content is None and calls:
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise RowProblem("bad_messages", where, f"message {i} ({message['role']}) needs text content")
        content = normalise_text(content)
        if not content and not calls:
            raise RowProblem("empty_field", where, f"message {i} ({message['role']}) is empty")
        entry = {"role": message["role"], "content": content}
        if calls:
            entry["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if message["role"] == "tool" and isinstance(message.get("tool_call_id"), str):
            entry["tool_call_id"] = message["tool_call_id"]
        messages.append(entry)
    if messages[-1]["role"] != "assistant":
        raise RowProblem(
            "bad_messages", column, "the last message must be the assistant's (it is what the model learns to write)"
        )
    if not any(m["role"] == "user" for m in messages):
        raise RowProblem("bad_messages", column, "the chat has no user message")
    return messages


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as read back from a prepared split (Arrow fills absent keys with None, tool calls are
    JSON text) in the form chat templates take: absent keys dropped, tool calls as objects."""
    out = []
    for message in messages:
        clean = {key: value for key, value in message.items() if value is not None}
        if isinstance(clean.get("tool_calls"), str):
            clean["tool_calls"] = json.loads(clean["tool_calls"])
        out.append(clean)
    return out


def _system(record: dict, spec: RowSpec) -> str | None:
    if spec.system and record.get(spec.system) is not None:
        return _text_field(record, spec.system, "system prompt")
    return spec.system_prompt


def _check_length(text: str, what: str, field: str, low: int, high: int) -> None:
    if len(text) < low:
        raise RowProblem(
            f"{what}_too_short", field, f"{what} has {len(text)} characters, below data.filters.min_{what}_chars={low}"
        )
    if len(text) > high:
        raise RowProblem(
            f"{what}_too_long", field, f"{what} has {len(text)} characters, above data.filters.max_{what}_chars={high}"
        )


def to_example(record: Any, spec: RowSpec, layout: str = "columns") -> dict:
    """Validate and normalise one parsed source record (in `layout`, see layouts.py) into an example,
    or raise RowProblem."""
    if not isinstance(record, dict):
        raise RowProblem("not_an_object", None, f"a row must be a JSON object, got {type(record).__name__}")
    tools = None
    if layout != "columns" or spec.kind == "chat":
        if layout == "columns":
            messages = _messages_field(record, spec.messages)
        else:
            raw_messages, tools = layouts.to_messages(record, layout, spec.messages)
            messages = check_messages(raw_messages, "conversations" if layout == "sharegpt" else spec.messages)
        if messages[0]["role"] != "system":
            system = _system(record, spec)
            if system:
                messages.insert(0, {"role": "system", "content": system})
        prompt_text = "\n".join(m["content"] for m in messages[:-1] if m["role"] != "system")
        _check_length(prompt_text, "prompt", spec.messages, spec.min_prompt_chars, spec.max_prompt_chars)
        _check_length(
            messages[-1]["content"], "response", spec.messages, spec.min_response_chars, spec.max_response_chars
        )
        # `tools` only where there are some: the content hash of every plain chat stays what it was.
        return {"messages": messages, "tools": tools} if tools else {"messages": messages}

    prompt = _text_field(record, spec.prompt, "prompt")
    _check_length(prompt, "prompt", spec.prompt, spec.min_prompt_chars, spec.max_prompt_chars)
    system = _system(record, spec)
    prompt_messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    if spec.kind == "prompt_response":
        response = _text_field(record, spec.response, "response")
        _check_length(response, "response", spec.response, spec.min_response_chars, spec.max_response_chars)
        return {"messages": prompt_messages + [{"role": "assistant", "content": response}]}
    if spec.kind == "preference":
        chosen = _text_field(record, spec.chosen, "chosen answer")
        rejected = _text_field(record, spec.rejected, "rejected answer")
        _check_length(chosen, "response", spec.chosen, spec.min_response_chars, spec.max_response_chars)
        _check_length(rejected, "response", spec.rejected, spec.min_response_chars, spec.max_response_chars)
        if chosen == rejected:
            raise RowProblem(
                "chosen_equals_rejected",
                spec.rejected,
                "chosen and rejected are the same text: the pair teaches nothing",
            )
        return {"prompt": prompt_messages, "chosen": chosen, "rejected": rejected}
    raise ValueError(f"unknown data kind {spec.kind!r}")


def kept_values(record: dict, spec: RowSpec) -> dict[str, str | None]:
    """The `data.keep_columns` of a record, as text (JSON for non-strings) so every shard has one schema."""
    out = {}
    for column in spec.keep_columns:
        if column not in record:
            raise RowProblem("missing_field", column, f"no field `{column}` (listed in data.keep_columns)")
        value = record[column]
        out[column] = value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


def content_hash(example: dict) -> str:
    """Hash of the normalised example: equal hashes are exact duplicates."""
    canonical = json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def split_key(example: dict) -> str:
    """What decides the split: the prompt alone, so one question never sits in two splits
    (two answers to the same prompt, or two preference pairs on it, stay together)."""
    prompt = example["prompt"] if "prompt" in example else example["messages"][:-1]
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def assign_split(key: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    """train / val / test from a hash of the key: independent of row order and of the other rows,
    so adding rows never moves an existing one to another split."""
    digest = hashlib.blake2b((salt + "\x00" + key).encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"
