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

ROLES = ("system", "user", "assistant")


class RowProblem(Exception):
    """Why a row cannot be used: a reason code (counted in the manifest), the field and a message."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


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
    if not isinstance(value, list) or not value:
        raise RowProblem(
            "wrong_type",
            column,
            f"`{column}` must be a non-empty list of {{role, content}} messages, got {type(value).__name__}",
        )
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise RowProblem(
                "bad_messages",
                f"{column}[{i}]",
                f"message {i} must be {{role: system|user|assistant, content: string}}, got {str(message)[:80]}",
            )
        content = normalise_text(message["content"])
        if not content:
            raise RowProblem("empty_field", f"{column}[{i}]", f"message {i} ({message['role']}) is empty")
        messages.append({"role": message["role"], "content": content})
    if messages[-1]["role"] != "assistant":
        raise RowProblem(
            "bad_messages", column, "the last message must be the assistant's (it is what the model learns to write)"
        )
    if not any(m["role"] == "user" for m in messages):
        raise RowProblem("bad_messages", column, "the chat has no user message")
    return messages


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


def to_example(record: Any, spec: RowSpec) -> dict:
    """Validate and normalise one parsed source record into an example, or raise RowProblem."""
    if not isinstance(record, dict):
        raise RowProblem("not_an_object", None, f"a row must be a JSON object, got {type(record).__name__}")
    if spec.kind == "chat":
        messages = _messages_field(record, spec.messages)
        if messages[0]["role"] != "system":
            system = _system(record, spec)
            if system:
                messages.insert(0, {"role": "system", "content": system})
        prompt_text = "\n".join(m["content"] for m in messages[:-1] if m["role"] != "system")
        _check_length(prompt_text, "prompt", spec.messages, spec.min_prompt_chars, spec.max_prompt_chars)
        _check_length(
            messages[-1]["content"], "response", spec.messages, spec.min_response_chars, spec.max_response_chars
        )
        return {"messages": messages}

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
