"""The HTTP ingress: OpenAI-compatible routes on FastAPI, served by Ray Serve.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events)
    GET  /v1/models             GET  /v1/stats         GET  /healthz

It checks the API key, validates the request (raytune_app/serve/protocol.py) and its prompt length
with the base model's tokenizer, so a bad request is answered with an OpenAI error object before any
model or the guard runs; then hands it to the router. Response headers say which model version
answered (`x-raytune-served-by`), whether the backup did (`x-raytune-failover`), the route taken and
the guard score.
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters' annotations at
# runtime, and as strings inside a Serve ingress class they would not resolve (`request` becomes a
# required query parameter).
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytune_app.serve import access, options, protocol

logger = logging.getLogger("ray.serve")
app = FastAPI(title="raytune-app", description="OpenAI-compatible serving of fine-tuned models, guarded.")


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


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, spec: dict, router):
        from raytune_app import models

        self.spec, self.router = spec, router
        self.keys = access.load_keys(spec["api_keys_env"], spec["api_keys_file"])
        self.tokenizer = models.load_tokenizer(
            spec["model"]["path"],
            spec["model"].get("tokenizer"),
            spec["model"].get("chat_template"),
            spec["model"].get("trust_remote_code", False),
        )
        self.created = int(time.time())
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

    def _prompt_tokens(self, request: dict) -> int:
        if request["kind"] == "chat":
            text = self.tokenizer.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return len(self.tokenizer(request["prompt"])["input_ids"])

    def _check_length(self, request: dict) -> None:
        limit = self.spec["max_prompt_tokens"] or (self.spec["context_length"] - request["max_tokens"])
        count = self._prompt_tokens(request)
        if count > limit:
            raise protocol.APIError(
                400,
                f"This model's maximum prompt length is {limit} tokens with max_tokens="
                f"{request['max_tokens']}; the prompt has {count}. Shorten it or lower max_tokens.",
                param="messages" if request["kind"] == "chat" else "prompt",
                code="context_length_exceeded",
            )
        request["max_prompt_tokens"] = limit

    async def _serve(self, request: Request, parse):
        model = "-"
        try:
            key = await self._authorise(request)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise protocol.APIError(
                    400, f"the request body is not valid JSON ({exc})", code="invalid_json"
                ) from None
            parsed = parse(body, self.spec["limits"])
            model = parsed["model"]
            parsed |= options.parse(body, parsed["kind"])  # response_format, seed, logprobs: options.py
            options.refuse_unsupported(parsed, self.spec.get("backend", "transformers"))
            self._check_length(parsed)
            parsed["guard_text"] = protocol.prompt_text(parsed)
            if parsed["stream"]:
                return await self._stream(parsed, key)
            result = await self.router.complete.remote(parsed, key)
            if "error" in result:
                return JSONResponse(result["error"]["body"], status_code=result["error"]["status"])
            body = protocol.reply(parsed, result, protocol.new_id(parsed["kind"]))
            return JSONResponse(body, headers=_headers(result["meta"]))
        except protocol.APIError as exc:
            if exc.status != 401:
                self.router.client_error.remote(model, exc.code or "bad_request")
            return JSONResponse(exc.body(), status_code=exc.status)
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
        head = await events.__anext__()
        if "error" in head:
            events.cancel()
            return JSONResponse(head["error"]["body"], status_code=head["error"]["status"])
        response_id, created = protocol.new_id(request["kind"]), int(time.time())
        # Bound here: Serve ships this class by value, and names used only inside the nested generator
        # are not carried along with it.
        encode, chunk, usage_chunk, error = _sse, protocol.chunk, protocol.usage_chunk, protocol.APIError

        async def sse():
            first = True
            try:
                async for event in events:
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
            except Exception as exc:
                logger.exception("stream failed")
                yield encode(
                    error(
                        500, f"the stream failed ({type(exc).__name__})", type="server_error", code="internal_error"
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
        return await self._keyed(request, lambda: self.router.summary.remote())

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}
