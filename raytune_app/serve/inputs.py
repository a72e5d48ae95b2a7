"""What a request body must be before anything reads it closely: size, strict JSON, and clean text.

    payload = parse_json(raw_bytes, max_depth=32)       # APIError 400 for anything but plain JSON
    normalise(request)                                  # messages / prompt -> NFKC text without invisibles
    segments(request)                                   # what the guard reads, newest message first

The ingress calls these in this order, before any tokenizer or model runs (raytune_app/serve/ingress.py);
every refusal is a protocol.APIError, so the client gets an OpenAI error object, never a 500:
- JSON that Python's parser takes but no client means: NaN / Infinity literals, numbers that overflow to
  infinity, integer literals longer than 64 digits (Python refuses to convert 4,300+ digits with a
  ValueError), nesting deeper than `max_depth` (deep enough nesting is a RecursionError);
- strings holding a lone UTF-16 surrogate ("\\ud800" is valid JSON; no encoder accepts it, so it would fail
  later, in the tokenizer or in writing the reply);
- text spelled in invisible Unicode tag characters (an instruction the reader cannot see; guard/normalize.py).
Then every message content (and the completion prompt) is normalised once (guard/normalize.py), and the
same normalised text goes to the guard and to the model. Pure Python, no Ray.
"""

from __future__ import annotations

import json
import math
from typing import Any

from raytune_app.guard.normalize import hidden_text, lone_surrogate, normalize
from raytune_app.serve.protocol import APIError

MAX_INT_DIGITS = 64  # no field of the API needs more; Python refuses 4,300+ with a ValueError


def _bad(message: str, param: str | None = None, code: str = "invalid_json") -> APIError:
    return APIError(400, message, param=param, code=code)


def _constant(name: str):
    raise _bad(f"the request body holds `{name}`, which is not valid JSON; send a finite number")


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _bad(f"the request body holds an integer with {digits} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _bad(f"the request body holds a number too large to represent ({text[:40]}...)")
    return value


def parse_json(raw: bytes, max_depth: int) -> Any:
    """The body as a Python value; APIError 400 for anything but plain, finite, shallow JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the request body is not UTF-8 (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_int=_integer, parse_float=_float)
    except APIError:
        raise
    except RecursionError:
        raise _bad(f"the request body is nested too deeply (more than {max_depth} levels)") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # int() beyond sys.get_int_max_str_digits, and the like
        raise _bad(f"the request body holds a value Python cannot read ({str(exc)[:120]})") from None
    _check(value, max_depth)
    return value


def _where(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the body"


def _check(value: Any, max_depth: int) -> None:
    """Depth and lone surrogates, without recursion (the value may be thousands of levels deep)."""
    stack: list[tuple[Any, int, list]] = [(value, 1, [])]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, (dict, list)) and depth > max_depth:
            raise _bad(f"the request body is nested too deeply (more than {max_depth} levels, at {_where(path)})")
        if isinstance(node, dict):
            for key, item in node.items():
                if lone_surrogate(key) >= 0:
                    raise _bad(f"a key in {_where(path)} holds a lone UTF-16 surrogate", code="invalid_value")
                stack.append((item, depth + 1, path + [key]))
        elif isinstance(node, list):
            stack.extend((item, depth + 1, path + [i]) for i, item in enumerate(node))
        elif isinstance(node, str) and lone_surrogate(node) >= 0:
            at = lone_surrogate(node)
            raise _bad(
                f"{_where(path)} holds a lone UTF-16 surrogate (\\u{ord(node[at]):04x} at character {at}), which is "
                "not text; encode characters outside the BMP as a surrogate pair or as UTF-8",
                param=_where(path) if path else None,
                code="invalid_value",
            )


def _clean(text: str, param: str) -> str:
    hidden = hidden_text(text)
    if hidden:
        raise APIError(
            400,
            f"{param} holds text written in invisible Unicode tag characters ({len(hidden)} characters); it is "
            "refused rather than passed on unseen. Send the text in visible characters.",
            param=param,
            code="hidden_text",
        )
    return normalize(text)


def normalise(request: dict) -> None:
    """Normalise a parsed request's text in place (protocol.parse_chat / parse_completion output)."""
    if request["kind"] == "completion":
        request["prompt"] = _clean(request["prompt"], "prompt")
        return
    for index, message in enumerate(request["messages"]):
        message["content"] = _clean(message["content"], f"messages[{index}].content")


def segments(request: dict) -> list[str]:
    """The texts the guard reads: every non-empty message, newest first (or the completion prompt)."""
    if request["kind"] == "completion":
        return [request["prompt"]]
    return [m["content"] for m in reversed(request["messages"]) if m["content"]] or [""]


def text_bytes(request: dict) -> int:
    """UTF-8 bytes of the request's text (the prompt or every message), for the token lower bound."""
    if request["kind"] == "completion":
        return len(request["prompt"].encode("utf-8"))
    return sum(len(m["content"].encode("utf-8")) for m in request["messages"])
