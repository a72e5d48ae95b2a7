"""The OpenAI wire format: request validation, error objects, replies and stream chunks.

Pure functions over dicts (no Ray, no FastAPI), so every rule is unit-tested on its own. A request that
breaks a rule raises `APIError`, which the ingress turns into an OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`) with the right HTTP status, never a traceback.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

ROLES = {"system", "developer", "user", "assistant", "tool"}
MIN_TEMPERATURE = 1e-3  # a positive temperature below this decodes greedily (see _common)
MIN_TOP_P = 1e-6
MAX_MODEL_CHARS = 256


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.extra = extra or {}

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code, **self.extra}
        }


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise APIError(
            400, f"`{name}` must be {what} from {low} to {high}; got {value!r}", param=name, code="invalid_value"
        )
    return value


def _stop(body: dict, limits: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    most, longest = limits.get("max_stop", 4), limits.get("max_stop_chars", 64)
    if not isinstance(stop, list) or len(stop) > most or not all(isinstance(s, str) and s for s in stop):
        raise APIError(
            400,
            f"`stop` must be a non-empty string or a list of up to {most} of them",
            param="stop",
            code="invalid_value",
        )
    too_long = [len(s) for s in stop if len(s) > longest]
    if too_long:
        raise APIError(
            400,
            f"`stop` strings may be at most {longest} characters long; got one of {too_long[0]}",
            param="stop",
            code="invalid_value",
        )
    return stop


def _content(message: dict, index: int, most_parts: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is served by these models
        if len(content) > most_parts:
            raise APIError(
                400,
                f"messages[{index}].content has {len(content)} parts; at most {most_parts} are accepted",
                param=f"messages[{index}].content",
                code="invalid_value",
            )
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"messages[{index}].content: only text parts are supported",
                    param=f"messages[{index}].content",
                    code="invalid_value",
                )
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise APIError(
        400,
        f"messages[{index}].content must be a string or a list of text parts",
        param=f"messages[{index}].content",
        code="invalid_value",
    )


def _common(body: Any, limits: dict) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
        raise APIError(
            400,
            "`model` is required: one of the ids GET /v1/models lists",
            param="model",
            code="missing_required_parameter" if not model else "invalid_value",
        )
    n = _number(body, "n", 1, 1, 1, integer=True)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, limits["default_max_tokens"], 1, limits["max_tokens"], integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "`stream` must be true or false", param="stream", code="invalid_value")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object", param="stream_options", code="invalid_value")
    temperature = float(_number(body, "temperature", limits["default_temperature"], 0, 2))
    if temperature < MIN_TEMPERATURE:
        # Dividing logits by a temperature near 0 overflows to inf and the probabilities to NaN; this close to
        # 0, sampling is greedy decoding anyway.
        temperature = 0.0
    return {
        "model": model,
        "n": n,
        "max_tokens": max_tokens,
        "stream": stream,
        "include_usage": bool(options.get("include_usage", False)),
        "temperature": temperature,
        # A nucleus below 1e-6 keeps the top token only, as 1e-6 does (and 0 would keep nothing).
        "top_p": max(MIN_TOP_P, float(_number(body, "top_p", 1.0, 0.0, 1.0))),
        "stop": _stop(body, limits),
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }


def parse_chat(body: Any, limits: dict) -> dict:
    """A validated chat request: {kind, model, messages, max_tokens, temperature, top_p, stop, stream, ...}."""
    request = _common(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(
            400,
            "`messages` must be a non-empty list of {role, content}",
            param="messages",
            code="missing_required_parameter",
        )
    most = limits.get("max_messages", 256)
    if len(messages) > most:
        raise APIError(
            400,
            f"`messages` holds {len(messages)} messages; at most {most} are accepted",
            param="messages",
            code="invalid_value",
        )
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(
                400,
                f"messages[{i}].role must be one of {sorted(ROLES)}",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        role = "system" if message["role"] == "developer" else message["role"]
        clean.append({"role": role, "content": _content(message, i, most)})
    return {**request, "kind": "chat", "messages": clean}


def parse_completion(body: Any, limits: dict) -> dict:
    """A validated completion request (one prompt string)."""
    request = _common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(
            400, "`prompt` must be a non-empty string (one prompt per request)", param="prompt", code="invalid_value"
        )
    return {**request, "kind": "completion", "prompt": prompt}


# ------------------------------------------------------------------------------------ replies


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def reply(request: dict, result: dict, response_id: str) -> dict:
    """The non-streaming body from the model's final result."""
    base = {
        "id": response_id,
        "created": int(time.time()),
        "model": request["model"],
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }
    if request["kind"] == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result["text"]},
            "logprobs": result.get("logprobs"),
            "finish_reason": result["finish_reason"],
        }
        return {**base, "object": "chat.completion", "choices": [choice]}
    choice = {
        "index": 0,
        "text": result["text"],
        "logprobs": result.get("logprobs"),
        "finish_reason": result["finish_reason"],
    }
    return {**base, "object": "text_completion", "choices": [choice]}


def chunk(
    request: dict,
    response_id: str,
    created: int,
    delta: str | None,
    finish_reason: str | None = None,
    first: bool = False,
    logprobs: dict | None = None,
) -> dict:
    """One streamed chunk (`delta` None with a finish reason: the closing chunk)."""
    if request["kind"] == "chat":
        piece = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": 0, "delta": piece, "logprobs": logprobs, "finish_reason": finish_reason}
        return {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request["model"],
            "choices": [choice],
        }
    choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": request["model"],
        "choices": [choice],
    }


def usage_chunk(request: dict, response_id: str, created: int, result: dict) -> dict:
    kind = "chat.completion.chunk" if request["kind"] == "chat" else "text_completion"
    return {
        "id": response_id,
        "object": kind,
        "created": created,
        "model": request["model"],
        "choices": [],
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }
