"""Reward functions for GRPO (`train.grpo.rewards`), and how a recipe's list becomes TRL's list.

Every reward has TRL's signature `reward(prompts, completions, **columns) -> list[float]`: one score
per completion. Completions arrive as text or, for chat data, as `[{"role": "assistant", "content": ...}]`;
`columns` holds the data's other columns per completion, among them `reference` (the answer the
prepared data gives for the prompt). A reward never raises on a malformed completion: a reply that
cannot be read scores the lowest value of that reward.

Built-ins, chosen by name (explicit dispatch in `build`):
    json_valid       1 if the reply is one JSON value and nothing else (a ``` fence allowed), else 0
    json_schema      1 if that JSON also satisfies the schema (the task's, or `schema_file`), else 0
    field_f1         F1 of the reply's JSON leaf fields against the reference's (0 for unreadable JSON)
    exact_answer     1 if the answer after `marker` (default `####`) equals the reference's, numbers
                     compared as numbers; else 0
    length_penalty   0 up to `max_chars` characters, then -`per_char` per extra character (at most -1)
    format           1 if the whole reply matches the regular expression `pattern`, else 0

No Ray here; unit-tested as plain functions.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from raytune_app.errors import DataError
from raytune_app.evaluate import metrics as M

BUILT_IN = ("json_valid", "json_schema", "field_f1", "exact_answer", "length_penalty", "format")


def completion_text(completion: Any) -> str:
    """The reply's text, whether TRL passes a string or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return ""


def json_valid(prompts, completions, **_) -> list[float]:
    return [1.0 if M.parse_json(completion_text(c))[0] else 0.0 for c in completions]


def json_schema(prompts, completions, validator=None, **_) -> list[float]:
    scores = []
    for completion in completions:
        parsed, value = M.parse_json(completion_text(completion))
        scores.append(1.0 if parsed and (validator is None or validator.is_valid(value)) else 0.0)
    return scores


def field_f1(prompts, completions, reference: Sequence[str] = (), **_) -> list[float]:
    scores = []
    for completion, gold in zip(completions, reference):
        if not M.parse_json(gold)[0]:
            scores.append(0.0)  # a reference that is not JSON gives nothing to compare fields with
            continue
        row = M.score_structured(completion_text(completion), gold)
        scores.append(M.precision_recall_f1(row["fields_matched"], row["fields_predicted"], row["fields_gold"])["f1"])
    return scores


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str, marker: str = "####") -> str | None:
    """What follows the last `marker` (the whole text when the reference has no marker), normalised:
    a number becomes its canonical form (1,000.0 -> 1000), other text is lower-cased and trimmed."""
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    text = text.strip().strip(".").strip()
    if not text:
        return None
    number = _NUMBER.search(text)
    if number and number.group(0).replace(",", "").replace("-", "").replace(".", "").isdigit():
        value = float(number.group(0).replace(",", ""))
        return str(int(value)) if value == int(value) else str(value)
    return " ".join(text.lower().split())


def exact_answer(prompts, completions, reference: Sequence[str] = (), marker: str = "####", **_) -> list[float]:
    scores = []
    for completion, gold in zip(completions, reference):
        text = completion_text(completion)
        answer = final_answer(text, marker) if marker in text else None
        scores.append(1.0 if answer is not None and answer == final_answer(gold, marker) else 0.0)
    return scores


def length_penalty(prompts, completions, max_chars: int = 400, per_char: float = 0.005, **_) -> list[float]:
    return [-min(1.0, max(0, len(completion_text(c)) - max_chars) * per_char) for c in completions]


def format_match(prompts, completions, pattern: str = ".*", **_) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]


class RewardError(DataError):
    """A reward in the recipe that cannot be used; says which and what to do."""


def load_user_function(path: str) -> Callable:
    """`package.module:function`, imported; RewardError naming the path when it cannot be."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward `{path}`: not a built-in ({', '.join(BUILT_IN)}) and not `package.module:function`")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(
            f"reward `{path}`: cannot import it ({exc}); check the module is on PYTHONPATH "
            "(on a cluster: in the job's working_dir or runtime_env)"
        ) from None
    if not callable(function):
        raise RewardError(f"reward `{path}` is not a function")
    return function


def _named(function: Callable, name: str, **bound) -> Callable:
    """A reward with its settings bound, named for TRL's per-reward log keys (rewards/<name>/mean)."""

    def reward(prompts, completions, **columns):
        return function(prompts, completions, **(columns | bound))

    reward.__name__ = name
    return reward


def build(specs: Sequence, validator=None) -> tuple[list[Callable], list[float]]:
    """(reward functions, weights) for TRL from `train.grpo.rewards`. `validator`: the task's JSON
    schema validator (json_schema uses it unless the spec names its own `schema_file`)."""
    functions = []
    for spec in specs:
        name, args = spec.function, dict(spec.args)
        if name == "json_valid":
            functions.append(_named(json_valid, name))
        elif name == "json_schema":
            schema_file = args.pop("schema_file", None)
            functions.append(
                _named(json_schema, name, validator=_validator_from(schema_file) if schema_file else validator)
            )
        elif name == "field_f1":
            functions.append(_named(field_f1, name))
        elif name == "exact_answer":
            functions.append(_named(exact_answer, name, **args))
        elif name == "length_penalty":
            functions.append(_named(length_penalty, name, **args))
        elif name == "format":
            functions.append(_named(format_match, name, **args))
        else:
            functions.append(_named(load_user_function(name), name.rpartition(":")[2], **args))
    return functions, [spec.weight for spec in specs]


def _validator_from(schema_file: str):
    import json

    import jsonschema

    from raytune_app import storage

    schema = json.loads(storage.read_text(storage.absolute(schema_file)))
    return jsonschema.validators.validator_for(schema)(schema)


def problems(specs: Sequence) -> list[str]:
    """Recipe-time checks of `train.grpo.rewards` (before any worker starts)."""
    out = []
    for index, spec in enumerate(specs):
        where = f"train.grpo.rewards.{index}"
        if spec.function in BUILT_IN:
            allowed = {
                "json_valid": set(),
                "json_schema": {"schema_file"},
                "field_f1": set(),
                "exact_answer": {"marker"},
                "length_penalty": {"max_chars", "per_char"},
                "format": {"pattern"},
            }[spec.function]
            unknown = set(spec.args) - allowed
            if unknown:
                out.append(f"{where}.args: {spec.function} takes {sorted(allowed) or 'no args'}, got {sorted(unknown)}")
            if spec.function == "format":
                try:
                    re.compile(spec.args.get("pattern", ""))
                except re.error as exc:
                    out.append(f"{where}.args.pattern: not a regular expression ({exc})")
            continue
        try:
            load_user_function(spec.function)
        except RewardError as exc:
            out.append(f"{where}.function: {exc}")
    return out
