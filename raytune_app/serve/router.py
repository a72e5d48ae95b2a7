"""The router deployment: the policy between the HTTP ingress and the models.

For every request it (1) has the guard score the prompt and refuses it in `enforce` mode, (2) picks the
adapter: the routed name goes to the champion, or to the challenger for `canary_percent` of requests;
other model ids go to their own adapter, (3) calls the primary LLM deployment and, when it errors or
passes `timeout_s`, the backup (marked in the answer), (4) in shadow mode sends the challenger a copy
whose reply is compared and discarded, and (5) measures champion / challenger divergence on served
replies; when the drift monitor trips, the challenger gets no more traffic and its registry alias is
moved back (raytune_app/registry/store.py `retire`). It also keeps the counters behind /v1/stats and
the Prometheus metrics. One replica holds this state, which is why it is its own deployment.

Replies are plain dicts: {"error": {status, body}} for a refusal, otherwise the model's result with
a "meta" entry ({served_by, failover, guard_score, route}).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ray import serve

from raytune_app.serve.drift import DriftMonitor
from raytune_app.serve.engine import BASE
from raytune_app.serve.llm import PromptError
from raytune_app.serve.options import OPTIONS, ModelRequestError, refuse_unsupported
from raytune_app.serve.protocol import APIError
from raytune_app.serve.stats import Stats

logger = logging.getLogger("ray.serve")
ROUTED = "__routed__"


def _refusal(status: int, message: str, code: str, param: str | None = None, **extra) -> dict:
    """A reply the ingress sends as it is: the status and the OpenAI error body (protocol.APIError's shape)."""
    error = APIError(
        status,
        message,
        type="invalid_request_error" if status < 500 else "server_error",
        param=param,
        code=code,
        extra=extra,
    )
    return {"error": {"status": status, "body": error.body()}}


def _model_refusal(exc: ModelRequestError) -> dict:
    """A model deployment's refusal (options.ModelRequestError; through Ray its fields are the cause's)."""
    cause = getattr(exc, "cause", exc)
    return _refusal(cause.status, cause.message, cause.code, cause.param)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
class Router:
    def __init__(self, spec: dict, primary, backup=None, guard=None):
        self.spec, self.primary, self.backup, self.guard = spec, primary, backup, guard
        self.canary = spec["canary_percent"] if spec["challenger"] else 0.0
        self.shadow = bool(spec["shadow"] and spec["challenger"])
        self.rng = random.Random(spec["seed"])
        drift = spec["drift"]
        self.monitor = DriftMonitor(drift["threshold"], drift["window"], drift["min_samples"])
        self.events: list[dict] = []
        self.stats = Stats(spec["pricing"], export=True)
        self.background: set = set()

    # -------------------------------------------------------------------------------- policy

    async def _screen(self, text: str, key: str | None) -> tuple[dict | None, float | None]:
        """The guard's verdict: (refusal or None, score)."""
        mode = self.spec["guard_mode"]
        if self.guard is None or mode == "off":
            return None, None
        began = time.perf_counter()
        verdict = await self.guard.score.remote(text)
        decision = "passed"
        if verdict["attack"]:
            decision = "blocked" if mode == "enforce" else "flagged"
            logger.warning(
                "guard %s a request: score %.4f >= threshold %.4f (key %s)",
                decision,
                verdict["score"],
                verdict["threshold"],
                key or "-",
            )
        self.stats.guard(decision, time.perf_counter() - began)
        if decision == "blocked":
            return _refusal(
                400,
                f"The prompt was refused by the guard: it scored {verdict['score']:.3f}, at or above the "
                f"threshold {verdict['threshold']:.3f} for prompt injection / jailbreak.",
                "prompt_refused",
                "messages",
                guard_score=verdict["score"],
            ), verdict["score"]
        return None, verdict["score"]

    def _target(self, model: str) -> tuple[str, str] | None:
        """(adapter key, route label) for a requested model id; None when the id is unknown."""
        key = self.spec["routes"].get(model)
        if key is None:
            return None
        if key != ROUTED:
            return key, "direct"
        if self.canary > 0 and self.rng.random() * 100 < self.canary:
            return self.spec["challenger"], "challenger"
        return self.spec["champion"], "champion"

    async def _begin(self, request: dict, key: str | None):
        if request["model"] not in self.spec["routes"]:
            known = ", ".join(sorted(self.spec["routes"]))
            return _refusal(
                404,
                f"The model `{request['model']}` does not exist here; served models: {known}.",
                "model_not_found",
                "model",
            ), None
        refusal, score = await self._screen(request["guard_text"], key)
        if refusal:
            return refusal, None
        adapter, route = self._target(request["model"])
        payload = {k: request[k] for k in ("kind", "max_tokens", "temperature", "top_p", "stop", "max_prompt_tokens")}
        payload |= {k: request.get(k) for k in OPTIONS}  # response_format, seed, logprobs (options.py)
        payload |= {"messages": request.get("messages"), "prompt": request.get("prompt"), "adapter": adapter}
        return None, {"payload": payload, "route": route, "guard_score": score}

    def _served_name(self, adapter: str, failover: bool) -> str:
        return "backup" if failover else self.spec["versions"].get(adapter, adapter)

    # ------------------------------------------------------------------------------- serving

    async def complete(self, request: dict, key: str | None = None) -> dict:
        began = time.perf_counter()
        refusal, plan = await self._begin(request, key)
        if refusal:
            return refusal
        payload, failover = plan["payload"], False
        try:
            call = self.primary.options(multiplexed_model_id=payload["adapter"]).generate.remote(payload)
            result = await asyncio.wait_for(call, timeout=self.spec["timeout_s"])
        except Exception as exc:  # a model fault or a timeout: the backup answers, when there is one
            if isinstance(exc, PromptError):
                return _refusal(400, str(exc).strip().splitlines()[-1], "context_length_exceeded", "messages")
            if isinstance(exc, ModelRequestError):  # refused by the model deployment: no failover
                return _model_refusal(exc)
            result = await self._failover(payload, exc, request["model"])
            if "error" in result:
                return result
            failover = True
        self._after(request, plan, result, failover, began, None, key)
        return result | {"meta": self._meta(plan, failover)}

    async def stream(self, request: dict, key: str | None = None):
        """Yields the meta (or a refusal) first, then the model's events."""
        began = time.perf_counter()
        refusal, plan = await self._begin(request, key)
        if refusal:
            yield refusal
            return
        payload, failover = plan["payload"], False
        events = self.primary.options(multiplexed_model_id=payload["adapter"], stream=True).stream.remote(payload)
        try:
            first = await asyncio.wait_for(events.__anext__(), timeout=self.spec["timeout_s"])
        except Exception as exc:
            events.cancel()
            if isinstance(exc, ModelRequestError):  # refused by the model deployment: no failover
                yield _model_refusal(exc)
                return
            if self.backup is None:
                self.stats.error(request["model"], type(exc).__name__)
                yield _refusal(
                    503,
                    f"The model failed before answering ({type(exc).__name__}) and no backup is configured.",
                    "model_unavailable",
                )
                return
            unable = self._backup_unable(payload, exc)
            if unable:
                yield unable
                return
            logger.warning("primary failed before its first token (%s); streaming from the backup", _describe(exc))
            failover = True
            events = self.backup.options(stream=True).stream.remote(payload | {"adapter": BASE})
            first = await events.__anext__()
        yield {"meta": self._meta(plan, failover)}
        ttft = time.perf_counter() - began
        last = first
        text = [first["delta"]]
        yield first
        async for event in events:
            text.append(event["delta"])
            last = event
            yield event
        self._after(request, plan, last | {"text": "".join(text)}, failover, began, ttft, key)

    async def _failover(self, payload: dict, exc: Exception, model: str) -> dict:
        self.stats.error(model, "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__)
        if self.backup is None:
            return _refusal(
                503, f"The model failed ({_describe(exc)}) and no backup is configured.", "model_unavailable"
            )
        unable = self._backup_unable(payload, exc)
        if unable:
            return unable
        logger.warning("primary failed on adapter %s (%s); the backup answers", payload["adapter"], _describe(exc))
        try:
            return await self.backup.generate.remote(payload | {"adapter": BASE})
        except Exception as backup_exc:
            self.stats.error(model, "backup_" + type(backup_exc).__name__)
            return _refusal(
                503, f"The model and its backup both failed ({_describe(backup_exc)}).", "model_unavailable"
            )

    def _backup_unable(self, payload: dict, exc: Exception) -> dict | None:
        """A 503 when the backup's backend cannot honour the request's options (response_format, logprobs,
        seed): an unconstrained answer to a constrained request is never sent."""
        backend = self.spec.get("backup_backend", "vllm")
        try:
            refuse_unsupported(payload, backend)
        except APIError as refused:
            self.stats.error(payload.get("adapter", "-"), "backup_unsupported_" + (refused.param or ""))
            return _refusal(
                503,
                f"The model failed ({_describe(exc)}) and the backup ({backend} backend) cannot honour "
                f"`{refused.param}`.",
                "model_unavailable",
                refused.param,
            )
        return None

    def _meta(self, plan: dict, failover: bool) -> dict:
        return {
            "served_by": self._served_name(plan["payload"]["adapter"], failover),
            "failover": failover,
            "route": plan["route"],
            "guard_score": plan["guard_score"],
        }

    def _after(self, request, plan, result, failover, began, ttft, key) -> None:
        """Count the answered request, then shadow and measure drift in the background."""
        adapter = plan["payload"]["adapter"]
        self.stats.request(
            request["model"],
            self._served_name(adapter, failover),
            result["prompt_tokens"],
            result["completion_tokens"],
            time.perf_counter() - began,
            ttft,
            failover,
            key,
        )
        challenger = self.spec["challenger"]
        if failover or not challenger or plan["route"] == "direct" or not (self.shadow or self.canary > 0):
            return
        if self.shadow and plan["route"] == "champion":
            self._spawn(self._shadow(plan["payload"], result["text"]))
        if self.rng.random() < self.spec["drift"]["sample_rate"]:
            self._spawn(self._measure(result["prompt_ids"], result["completion_ids"]))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)  # keep a reference until done (the loop holds tasks weakly)
        task.add_done_callback(self.background.discard)

    async def _shadow(self, payload: dict, champion_text: str) -> None:
        try:
            copy = payload | {"adapter": self.spec["challenger"]}
            result = await self.primary.options(multiplexed_model_id=copy["adapter"]).generate.remote(copy)
            self.monitor.add_comparison(champion_text, result["text"])
        except Exception as exc:
            logger.warning("shadow request to the challenger failed: %s", _describe(exc))

    async def _measure(self, prompt_ids: list[int], reply_ids: list[int]) -> None:
        if not (self.shadow or self.canary > 0):
            return  # rolled back while this was queued
        try:
            challenger = self.spec["challenger"]
            measured = await self.primary.options(multiplexed_model_id=challenger).divergence.remote(
                prompt_ids, reply_ids, self.spec["champion"], challenger
            )
        except Exception as exc:
            logger.warning("drift measurement failed: %s", _describe(exc))
            return
        if self.monitor.add(measured["kl"], measured["top1_agreement"]) and (self.shadow or self.canary > 0):
            await self._roll_back()

    async def _roll_back(self) -> None:
        summary = self.monitor.summary()
        challenger = self.spec["versions"].get(self.spec["challenger"], self.spec["challenger"])
        self.canary, self.shadow = 0.0, False
        reason = f"mean KL {summary['mean_kl']:.4f} > {summary['threshold']} over {summary['samples']} requests"
        event = {
            "time": time.time(),
            "event": "rollback",
            "challenger": challenger,
            "reason": reason,
            "drift": summary,
            "registry": None,
        }
        registry = self.spec.get("challenger_registry")
        if registry and self.spec["drift"]["rollback"]:
            from raytune_app.registry import store

            try:
                event["registry"] = await asyncio.get_running_loop().run_in_executor(
                    None,
                    store.retire,
                    registry["tracking_uri"],
                    registry["name"],
                    "challenger",
                    registry["version"],
                    reason,
                )
            except Exception as exc:
                event["registry"] = {"moved": False, "why": _describe(exc)}
        self.events.append(event)
        logger.warning("challenger %s rolled back: %s; registry: %s", challenger, reason, event["registry"])

    # ------------------------------------------------------------------------------ counters

    async def client_error(self, model: str, code: str) -> None:
        self.stats.error(model or "-", code)

    async def auth_failure(self) -> None:
        self.stats.auth_failure()

    async def summary(self) -> dict:
        primary = await self.primary.info.remote()
        guard = await self.guard.info.remote() if self.guard is not None else None
        return self.stats.summary() | {
            "routing": {
                "name": self.spec["name"],
                "champion": self._served_name(self.spec["champion"], False),
                "challenger": self._served_name(self.spec["challenger"], False) if self.spec["challenger"] else None,
                "canary_percent": self.canary,
                "shadow": self.shadow,
                "backup": self.backup is not None,
            },
            "drift": self.monitor.summary(),
            "events": self.events,
            "llm": primary,
            "guard_model": guard,
            "guard_mode": self.spec["guard_mode"] if guard else "off",
        }


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]
