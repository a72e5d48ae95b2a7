"""Generation options beyond the basic sampling ones, and what each serving backend can honour.

    options = parse(body, "chat")            # {response_format, seed, logprobs, top_logprobs}, validated
    refuse_unsupported(request, "transformers")   # APIError 400 naming the parameter it cannot honour

`response_format` ({"type": "text" | "json_object" | "json_schema", ...}), `seed`, `logprobs` and
`top_logprobs` mean what they mean in the OpenAI API. The vLLM backend honours all of them (structured
outputs, per-request seeded sampling, token logprobs); the transformers backend honours none, and a
request that asks it for one is refused with HTTP 400 naming the parameter -- never answered with
unconstrained text it did not ask for. A seed on a greedy request changes nothing, so it is accepted
everywhere.

`ModelRequestError` is what a model deployment raises for a request it refuses (an adapter it cannot
load with its settings, a schema its grammar compiler rejects): the router answers it as an OpenAI
error with that status and does not fail over, and the replica keeps serving. Pure Python; no Ray.
"""

from __future__ import annotations

from typing import Any

from raytune_app.serve.protocol import APIError

# The keys `parse` adds to a request; the router hands them to the model deployment as they are.
OPTIONS = ("response_format", "seed", "logprobs", "top_logprobs")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs


class ModelRequestError(ValueError):
    """A request a model deployment refuses; the router answers with `status` and the OpenAI error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def __reduce__(self):  # crosses Ray's process boundary with its fields
        return (type(self), (self.status, self.message, self.code, self.param))


def _response_format(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(
            400,
            '`response_format` must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
            param="response_format",
            code="invalid_value",
        )
    if value["type"] == "text":
        return None  # no constraint
    if value["type"] == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise APIError(
            400,
            "`response_format.json_schema` must be an object with the JSON Schema in `schema`",
            param="response_format.json_schema",
            code="invalid_value",
        )
    import jsonschema

    try:
        jsonschema.validators.validator_for(spec["schema"]).check_schema(spec["schema"])
    except jsonschema.SchemaError as exc:
        raise APIError(
            400,
            f"`response_format.json_schema.schema` is not a valid JSON Schema: {exc.message}",
            param="response_format.json_schema.schema",
            code="invalid_value",
        ) from None
    name = spec.get("name") if isinstance(spec.get("name"), str) else "reply"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": spec["schema"], "strict": True}}


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise APIError(
            400, f"`{name}` must be an integer from {low} to {high}; got {value!r}", param=name, code="invalid_value"
        )
    return value


def parse(body: dict, kind: str) -> dict:
    """The validated options of a request body (`kind`: chat or completion); absent ones are None."""
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    if kind == "chat":
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise APIError(400, "`logprobs` must be true or false", param="logprobs", code="invalid_value")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs", code="invalid_value")
        logprobs = bool(logprobs)
    else:  # the completions API's logprobs is the number of alternatives per token
        logprobs, top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS), None
    return {
        "response_format": _response_format(body.get("response_format")),
        "seed": seed,
        "logprobs": logprobs,
        "top_logprobs": top,
    }


def refuse_unsupported(request: dict, backend: str) -> None:
    """APIError 400 when `backend` cannot honour an option the request sets."""
    if backend == "vllm":
        return
    asked = []
    if request.get("response_format") is not None:
        asked.append("response_format")
    if request.get("logprobs") not in (None, False):
        asked.append("logprobs")
    if request.get("seed") is not None and request.get("temperature", 0) > 0:
        asked.append("seed")
    if asked:
        raise APIError(
            400,
            f"`{asked[0]}` is not supported by this server's `{backend}` backend (it would be ignored, so the "
            "request is refused); serve with `serve.backend: vllm` for response_format, logprobs and seed",
            param=asked[0],
            code="unsupported_parameter",
        )
