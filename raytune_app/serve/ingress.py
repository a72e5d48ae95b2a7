"""The HTTP ingress: OpenAI-compatible routes on FastAPI, served by Ray Serve.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events)
    GET  /v1/models             GET  /v1/stats         GET  /healthz        (/docs when serve.docs)

A request goes through cheap checks first and reaches a tokenizer or a model only if it passes them all,
each answered with an OpenAI error object (never a 500 or a traceback): the API key (401), admission (429
with Retry-After, before the body is read, past this replica's share of the primary's capacity: in a flood
the surplus is told at once and costs no parsing, tokenising or router call), the body size
(413, from Content-Length before the body is read, or while reading it), strict JSON (serve/inputs.py),
the request schema and limits (serve/protocol.py: stop strings, messages, sampling values), invisible
text (refused) and normalisation (the same text then goes to the guard and the model), a lower bound on
the prompt's tokens from its bytes, then the prompt's real token count (in a worker thread: a long prompt
does not hold up the event loop) against the context: prompt + max_tokens must fit (400 naming the
numbers). Then the router gets it (serve/router.py), within a timeout; a router that fails or is gone is a
503, a full queue a 429 with Retry-After. A client that disconnects cancels its request downstream.

Response headers say which model version answered (`x-raytune-served-by`), whether the backup did
(`x-raytune-failover`), the route taken, and the guard score only when serve.guard.expose_score is on.
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters' annotations at
# runtime, and as strings inside a Serve ingress class they would not resolve (`request` becomes a
# required query parameter).
import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytune_app.serve import access, inputs, options, prompt, protocol

logger = logging.getLogger("ray.serve")
# The interactive docs and schema are off unless serve.docs turns them on (routes below, checked per request).
app = FastAPI(
    title="raytune-app",
    description="OpenAI-compatible serving of fine-tuned models, guarded.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown paths and wrong methods answer in the OpenAI error shape too.
    error = protocol.APIError(
        exc.status_code,
        f"{request.method} {request.url.path}: {exc.detail}",
        code="not_found" if exc.status_code == 404 else "method_not_allowed",
    )
    return JSONResponse(error.body(), status_code=exc.status_code)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _headers(meta: dict) -> dict:
    headers = {
        "x-raytune-served-by": str(meta["served_by"]),
        "x-raytune-failover": str(meta["failover"]).lower(),
        "x-raytune-route": meta["route"],
    }
    if meta.get("guard_score") is not None:
        headers["x-raytune-guard-score"] = f"{meta['guard_score']:.6f}"
    return headers


async def _await(response):
    # Defined before the class: Serve pickles the ingress class when it is decorated, with the module
    # globals it names that exist by then.
    return await response


def _busy() -> protocol.APIError:
    """The 429 of a full server (the caller adds Retry-After): this replica's share taken, or a full queue."""
    return protocol.APIError(
        429,
        "The server is at capacity; retry after the time in Retry-After.",
        type="rate_limit_error",
        code="server_busy",
    )


def _unavailable(exc: BaseException) -> protocol.APIError:
    """The router failed, is restarting, is full, or took too long: 503 / 429, never a 500."""
    name = type(exc).__name__
    if "BackPressure" in name:
        return _busy()
    if isinstance(exc, asyncio.TimeoutError):
        return protocol.APIError(503, "The request timed out inside the server.", type="server_error", code="timeout")
    return protocol.APIError(
        503, f"The service is unavailable ({name}); retry shortly.", type="server_error", code="service_unavailable"
    )


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, spec: dict, router):
        from raytune_app import models

        self.spec, self.router = spec, router
        self.limits = spec["limits"]
        # Keys are read here, on the replica, from its own environment and files: checked again, since the
        # replica's environment is what counts (an env var set only where the app was planned does not reach it).
        self.keys = access.load_keys(spec["api_keys_env"], spec["api_keys_file"])
        access.require_keys(self.keys, spec.get("host", "127.0.0.1"), spec.get("allow_open", False))
        self.tokenizer = models.load_tokenizer(
            spec["model"]["path"],
            spec["model"].get("tokenizer"),
            spec["model"].get("chat_template"),
            spec["model"].get("trust_remote_code", False),
            spec.get("tokenizer_class"),  # the class the plan's AutoTokenizer chose: no torch in this replica
        )
        self.bytes_per_token = prompt.max_token_bytes(self.tokenizer)
        # The router bounds each of its steps (guard, primary, backup); this bounds the whole, with a margin.
        self.router_timeout_s = self.limits["guard_timeout_s"] + 2 * self.limits["timeout_s"] + 10
        self.created = int(time.time())
        # Chat / completion requests between admission here and the router's answer (a stream: its first
        # event); past this replica's share of the primary's capacity the surplus is refused unread. Refusals
        # are reported to the router's counters in one call a second, not one call each.
        self.admission, self.admitted = spec.get("admission"), 0
        self.shed_unreported = 0
        self.shed_report: asyncio.Task | None = None
        logger.info(
            "ingress ready: models %s, API keys %s", spec["models"], "required" if self.keys else "not required"
        )

    # --------------------------------------------------------------------------------- helpers

    async def _authorise(self, request: Request) -> str | None:
        try:
            return access.check(request.headers.get("authorization"), self.keys)
        except PermissionError as exc:
            self.router.auth_failure.remote()
            raise protocol.APIError(401, str(exc), type="authentication_error", code="invalid_api_key") from None

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to pass max_body_bytes."""
        limit = self.limits["max_body_bytes"]
        too_large = protocol.APIError(
            413,
            f"The request body is larger than {limit} bytes (serve.limits.max_body_bytes).",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _count(self, request: dict) -> int:
        if request["kind"] == "chat":
            return len(prompt.chat_ids(self.tokenizer, request["messages"]))
        return len(prompt.text_ids(self.tokenizer, request["prompt"]))

    async def _check_length(self, request: dict) -> None:
        context, wanted = self.spec["context_length"], request["max_tokens"]
        limit = min(self.spec["max_prompt_tokens"] or context, context - wanted)
        param = "messages" if request["kind"] == "chat" else "prompt"

        def refuse(count: str) -> protocol.APIError:
            return protocol.APIError(
                400,
                f"This model's context is {context} tokens: the prompt ({count} tokens) plus max_tokens ({wanted}) "
                f"must fit, so prompts may have at most {limit} tokens with this max_tokens. Shorten the prompt or "
                "lower max_tokens.",
                param=param,
                code="context_length_exceeded",
            )

        if limit < 1:
            raise refuse("any number of")
        # No token covers more bytes than the longest vocabulary entry: a prompt whose bytes need more tokens
        # than the limit is refused before the tokenizer runs.
        at_least = -(-inputs.text_bytes(request) // self.bytes_per_token)
        if at_least > limit:
            raise refuse(f"at least {at_least}")
        try:
            count = await asyncio.get_running_loop().run_in_executor(None, self._count, request)
        except prompt.PromptError as exc:
            raise protocol.APIError(400, str(exc), param=param, code="invalid_messages") from None
        if count > limit:
            raise refuse(str(count))
        request["max_prompt_tokens"] = limit

    def _shed(self) -> protocol.APIError:
        """The 429 for a request past this replica's admission share, counted for the router's stats."""
        self.shed_unreported += 1
        if self.shed_report is None or self.shed_report.done():
            self.shed_report = asyncio.get_running_loop().create_task(self._report_shed())
        return _busy()

    async def _report_shed(self) -> None:
        await asyncio.sleep(1.0)  # however large the flood, one router call a second
        count, self.shed_unreported = self.shed_unreported, 0
        self.router.shed_unread.remote(count)

    def _error(self, exc: protocol.APIError, model: str) -> JSONResponse:
        if exc.status < 500 and exc.status not in (401, 429):
            self.router.client_error.remote(model, exc.code or "bad_request")
        headers = {"retry-after": str(self.limits["retry_after_s"])} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def _serve(self, request: Request, parse):
        """The key, then admission: a request past this replica's share of the capacity is refused before
        its body is read; an admitted one holds its place until the router answers (a stream: starts)."""
        try:
            key = await self._authorise(request)
            if self.admission and self.admitted >= self.admission:
                raise self._shed()
        except protocol.APIError as exc:
            return self._error(exc, "-")
        self.admitted += 1
        try:
            return await self._answer(request, parse, key)
        finally:
            self.admitted -= 1

    async def _answer(self, request: Request, parse, key: str | None):
        model = "-"
        try:
            body = inputs.parse_json(await self._body(request), self.limits["max_json_depth"])
            parsed = parse(body, self.limits)
            model = parsed["model"]
            parsed |= options.parse(body, parsed["kind"])  # response_format, seed, logprobs: options.py
            options.refuse_unsupported(parsed, self.spec.get("backend", "transformers"))
            inputs.normalise(parsed)
            await self._check_length(parsed)
            parsed["guard_segments"] = inputs.segments(parsed)
            if parsed["stream"]:
                return await self._stream(parsed, key)
            call = self.router.complete.remote(parsed, key)
            try:
                result = await asyncio.wait_for(_await(call), timeout=self.router_timeout_s)
            except asyncio.CancelledError:
                call.cancel()  # the client went away: stop its generation downstream
                raise
            except Exception as exc:
                call.cancel()
                logger.warning("router call failed: %s: %s", type(exc).__name__, str(exc)[:300])
                raise _unavailable(exc) from None
            if "error" in result:
                error = result["error"]
                return JSONResponse(error["body"], status_code=error["status"], headers=error.get("headers") or None)
            body = protocol.reply(parsed, result, protocol.new_id(parsed["kind"]))
            return JSONResponse(body, headers=_headers(result["meta"]))
        except protocol.APIError as exc:
            return self._error(exc, model)
        except Exception as exc:  # never a traceback to the client; the log has it
            logger.exception("request failed")
            error = protocol.APIError(
                500,
                f"internal error ({type(exc).__name__}); the server log has the details",
                type="server_error",
                code="internal_error",
            )
            return JSONResponse(error.body(), status_code=500)

    async def _stream(self, request: dict, key: str | None):
        events = self.router.options(stream=True).stream.remote(request, key)
        try:
            head = await asyncio.wait_for(events.__anext__(), timeout=self.router_timeout_s)
        except asyncio.CancelledError:
            events.cancel()
            raise
        except Exception as exc:
            events.cancel()
            logger.warning("router stream failed to start: %s: %s", type(exc).__name__, str(exc)[:300])
            raise _unavailable(exc) from None
        if "error" in head:
            events.cancel()
            error = head["error"]
            return JSONResponse(error["body"], status_code=error["status"], headers=error.get("headers") or None)
        response_id, created = protocol.new_id(request["kind"]), int(time.time())
        idle_s = self.limits["timeout_s"] + 10
        # Bound here: Serve ships this class by value, and names used only inside the nested generator
        # are not carried along with it.
        encode, chunk, usage_chunk, error = _sse, protocol.chunk, protocol.usage_chunk, protocol.APIError

        async def sse():
            first = True
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.__anext__(), timeout=idle_s)
                    except StopAsyncIteration:
                        break
                    if "error" in event:  # the model failed mid-stream: the router says so, as a 503 body
                        yield encode(event["error"]["body"])
                        break
                    if event["delta"] or first or event.get("logprobs"):
                        yield encode(
                            chunk(
                                request,
                                response_id,
                                created,
                                event["delta"],
                                first=first,
                                logprobs=event.get("logprobs"),
                            )
                        )
                        first = False
                    if "finish_reason" in event:
                        yield encode(chunk(request, response_id, created, None, event["finish_reason"]))
                        if request["include_usage"]:
                            yield encode(usage_chunk(request, response_id, created, event))
                        break
            except (asyncio.CancelledError, GeneratorExit):
                events.cancel()  # the client disconnected: the generation behind it stops
                raise
            except Exception as exc:
                events.cancel()
                logger.warning("stream failed: %s: %s", type(exc).__name__, str(exc)[:300])
                yield encode(
                    error(
                        503, f"the stream failed ({type(exc).__name__})", type="server_error", code="model_unavailable"
                    ).body()
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=_headers(head["meta"]))

    # ---------------------------------------------------------------------------------- routes

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, protocol.parse_chat)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, protocol.parse_completion)

    async def _keyed(self, request: Request, answer):
        """`answer()` for a request with a valid key (or when the API is open); the 401 otherwise."""
        try:
            await self._authorise(request)
        except protocol.APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return await answer()

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        async def models():
            return {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": self.created, "owned_by": "raytune-app"}
                    for m in self.spec["models"]
                ],
            }

        return await self._keyed(request, models)

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        async def summary():
            try:
                return await asyncio.wait_for(_await(self.router.summary.remote()), timeout=30)
            except Exception as exc:
                error = _unavailable(exc)
                return JSONResponse(error.body(), status_code=error.status)

        return await self._keyed(request, summary)

    @app.get("/healthz")
    async def healthz(self):
        """200 when every deployment behind this ingress answers; 503 naming the ones that do not."""
        try:
            deployments = await asyncio.wait_for(_await(self.router.health.remote()), timeout=10)
        except Exception as exc:
            deployments = {"router": f"failing ({type(exc).__name__})"}
        deployments = {"ingress": "ok", **deployments}
        healthy = all(v in ("ok", "busy") for v in deployments.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", "deployments": deployments}, status_code=200 if healthy else 503
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        if not self.spec.get("docs"):
            raise StarletteHTTPException(404, "Not Found")
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        if not self.spec.get("docs"):
            raise StarletteHTTPException(404, "Not Found")
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="raytune-app")
        return HTMLResponse(page.body.decode())
