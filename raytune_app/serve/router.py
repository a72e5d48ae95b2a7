"""The router deployment: the policy between the HTTP ingress and the models.

For every request it (1) has the guard read the whole prompt (every message, in windows; serve/guard_scorer.py)
and refuses it in `enforce` mode, (2) picks the adapter: the routed name goes to the champion, or to the
challenger for `canary_percent` of requests; other model ids go to their own adapter, (3) calls the primary
LLM deployment and, when it errors or passes `timeout_s` (then it is cancelled), the backup (marked in the
answer), (4) in shadow mode sends the challenger a copy whose reply is compared and discarded, and (5)
measures champion / challenger divergence on served replies; when the drift monitor trips, the challenger
gets no more traffic and its registry alias is moved back (serve/rollout.py: durable, retried until done).

Every call to another deployment has a timeout and is cancelled when it passes it or when the caller goes
away (a client that disconnected stops its generation). A full queue at the models (Serve's
`max_queued_requests`) is a 429 with Retry-After, and so is a request arriving when the primary's whole
capacity is taken (app.admission_capacity): refused before the guard reads it, so an overload's surplus is
answered at once; a model or guard that fails or times out is a 503;
never a 500 or a hang. It also keeps the counters behind /v1/stats and the Prometheus metrics. Exactly one
replica holds this state (serve/settings.py refuses more).

Replies are plain dicts: {"error": {status, body, headers}} for a refusal, otherwise the model's result with
a "meta" entry ({served_by, failover, guard_score, route}).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from ray import serve
from ray.serve.exceptions import BackPressureError

from raytune_app.serve.drift import DriftMonitor
from raytune_app.serve.engine import BASE
from raytune_app.serve.options import OPTIONS, ModelRequestError, refuse_unsupported
from raytune_app.serve.prompt import PromptError
from raytune_app.serve.protocol import APIError
from raytune_app.serve.rollout import Rollout
from raytune_app.serve.stats import Stats

logger = logging.getLogger("ray.serve")
ROUTED = "__routed__"
UNKNOWN_MODEL = "unknown"  # the metrics label of model ids nobody serves (labels stay a bounded set)


def _refusal(status: int, message: str, code: str, param: str | None = None, headers: dict | None = None) -> dict:
    """A reply the ingress sends as it is: the status, the OpenAI error body (protocol.APIError's shape), headers."""
    error = APIError(
        status,
        message,
        type="invalid_request_error" if status < 500 else "server_error",
        param=param,
        code=code,
    )
    if status == 429:
        error.type = "rate_limit_error"
    return {"error": {"status": status, "body": error.body(), "headers": headers or {}}}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def _is_backpressure(exc: BaseException) -> bool:
    return isinstance(exc, BackPressureError) or "BackPressureError" in type(exc).__name__


async def _call(response, timeout_s: float):
    """Await a deployment call; cancel it when it passes `timeout_s` or when this request is cancelled
    (awaiting a Serve response and giving up does not stop the work on the replica: `cancel` does)."""
    try:
        return await asyncio.wait_for(_resolve(response), timeout=timeout_s)
    except BaseException:
        response.cancel()
        raise


async def _resolve(response):
    return await response


async def _next(events, timeout_s: float):
    """The next event of a streamed call (StopAsyncIteration at its end), within `timeout_s`."""
    try:
        return await asyncio.wait_for(events.__anext__(), timeout=timeout_s)
    except StopAsyncIteration:
        raise
    except BaseException:
        events.cancel()
        raise


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
        self.stats = Stats(spec["pricing"], export=True, models=sorted(spec["routes"]) + [UNKNOWN_MODEL])
        self.background: set = set()
        self.retry_after = {"retry-after": str(spec.get("retry_after_s", 1))}
        # Requests between arrival here and their model's answer (a stream: its first event), the guard's
        # reading included; past the primary's capacity the surplus is refused before the guard reads it.
        self.capacity, self.admitted = spec.get("admission_capacity"), 0
        self.rollout: Rollout | None = None
        self.rollback_pending, self._retry_later = False, False
        if spec["challenger"]:
            # The registry (and Ray's GCS) may say this challenger was rolled back before: by an earlier router.
            label = spec["versions"].get(spec["challenger"], spec["challenger"])
            self.rollout = Rollout(spec.get("challenger_registry"), spec["name"], label)
            earlier = self.rollout.restore()
            if earlier is not None:
                self.canary, self.shadow = 0.0, False
                self.events.append(earlier)
                logger.warning("challenger %s was rolled back before this router started: %s", label, earlier["reason"])
                moved = (earlier.get("registry") or {}).get("moved") is True
                if not moved and spec.get("challenger_registry") and drift["rollback"]:
                    self._set_pending(True)
                    self._retry_later = True  # the retry loop needs the event loop: started on the first call

    def _label(self, model: str) -> str:
        return model if model in self.spec["routes"] else UNKNOWN_MODEL

    def _timeout(self) -> float:
        return self.spec["timeout_s"]

    # -------------------------------------------------------------------------------- policy

    async def _screen(self, segments: list[str], key: str | None) -> tuple[dict | None, float | None]:
        """The guard's verdict on the whole prompt: (refusal or None, score)."""
        mode = self.spec["guard_mode"]
        if self.guard is None or mode == "off":
            return None, None
        began = time.perf_counter()
        try:
            verdict = await _call(self.guard.score.remote(segments), self.spec.get("guard_timeout_s", 10.0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Fail closed in enforce mode: a prompt nobody read is not served.
            self.stats.guard("error", time.perf_counter() - began)
            logger.warning("guard call failed (%s)", _describe(exc))
            if mode == "monitor":
                return None, None
            if _is_backpressure(exc):
                return _refusal(
                    429, "The server is busy; retry shortly.", "server_busy", headers=self.retry_after
                ), None
            return _refusal(503, "The prompt guard is unavailable; retry shortly.", "guard_unavailable"), None
        decision = "passed"
        if verdict["attack"] or (verdict.get("over_limit") and mode == "enforce"):
            decision = "blocked" if mode == "enforce" else "flagged"
            logger.warning(
                "guard %s a request: score %.4f (threshold %.4f, %d windows, worst in message %d from the end) key %s",
                decision,
                verdict["score"],
                verdict["threshold"],
                verdict.get("windows", 1),
                verdict.get("segment", 0),
                key or "-",
            )
        self.stats.guard(decision, time.perf_counter() - began)
        if decision != "blocked":
            return None, verdict["score"]
        if verdict.get("over_limit") and not verdict["attack"]:
            message = (
                f"The prompt is too long for the guard to read ({verdict['windows']} windows; at most "
                f"{self.spec.get('max_windows', '?')}). Shorten it."
            )
        elif self.spec.get("expose_guard_score"):
            message = (
                f"The prompt was refused by the guard: it scored {verdict['score']:.3f}, at or above the "
                f"threshold {verdict['threshold']:.3f} for prompt injection / jailbreak."
            )
        else:
            message = "The prompt was refused by the guard as a likely prompt injection or jailbreak."
        refusal = _refusal(400, message, "prompt_refused", "messages")
        if self.spec.get("expose_guard_score"):
            refusal["error"]["body"]["error"]["guard_score"] = verdict["score"]
        return refusal, verdict["score"]

    def _target(self, model: str) -> tuple[str, str]:
        """(adapter key, route label) for a served model id (the caller has refused unknown ids)."""
        key = self.spec["routes"][model]
        if key != ROUTED:
            return key, "direct"
        if self.canary > 0 and self.rng.random() * 100 < self.canary:
            return self.spec["challenger"], "challenger"
        return self.spec["champion"], "champion"

    async def _begin(self, request: dict, key: str | None):
        await self._ensure_retry()
        if request["model"] not in self.spec["routes"]:
            known = ", ".join(sorted(self.spec["routes"]))
            self.stats.error(UNKNOWN_MODEL, "model_not_found")
            return _refusal(
                404, f"That model does not exist here; served models: {known}.", "model_not_found", "model"
            ), None
        if self.capacity and self.admitted > self.capacity:
            return self._busy(request["model"]), None
        refusal, score = await self._screen(request["guard_segments"], key)
        if refusal:
            return refusal, None
        adapter, route = self._target(request["model"])
        payload = {k: request[k] for k in ("kind", "max_tokens", "temperature", "top_p", "stop", "max_prompt_tokens")}
        payload |= {k: request.get(k) for k in OPTIONS}  # response_format, seed, logprobs (options.py)
        payload |= {"messages": request.get("messages"), "prompt": request.get("prompt"), "adapter": adapter}
        return None, {"payload": payload, "route": route, "guard_score": score}

    def _served_name(self, adapter: str, failover: bool) -> str:
        return "backup" if failover else self.spec["versions"].get(adapter, adapter)

    def _busy(self, model: str) -> dict:
        self.stats.error(self._label(model), "shed")
        return _refusal(
            429,
            "The server is at capacity; retry after the time in Retry-After.",
            "server_busy",
            headers=self.retry_after,
        )

    # ------------------------------------------------------------------------------- serving

    async def complete(self, request: dict, key: str | None = None) -> dict:
        self.admitted += 1
        try:
            return await self._complete(request, key)
        finally:
            self.admitted -= 1

    async def _complete(self, request: dict, key: str | None) -> dict:
        began = time.perf_counter()
        refusal, plan = await self._begin(request, key)
        if refusal:
            return refusal
        payload, failover = plan["payload"], False
        try:
            call = self.primary.options(multiplexed_model_id=payload["adapter"]).generate.remote(payload)
            result = await _call(call, self._timeout())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a model fault or a timeout: the backup answers, when there is one
            if isinstance(exc, PromptError):
                return _refusal(400, str(exc).strip().splitlines()[-1], "context_length_exceeded", "messages")
            if _is_backpressure(exc):
                return self._busy(request["model"])
            if isinstance(exc, ModelRequestError):  # refused by the model deployment: no failover
                return _model_refusal(exc)
            result = await self._failover(payload, exc, request["model"])
            if "error" in result:
                return result
            failover = True
        self._after(request, plan, result, failover, began, None, key)
        return result | {"meta": self._meta(plan, failover)}

    async def stream(self, request: dict, key: str | None = None):
        """Yields the meta (or a refusal) first, then the model's events; a failure after the first event
        ends the stream with {"error": ...} (503)."""
        began = time.perf_counter()
        # Counted while it waits for the guard and the model's first event: nothing is yielded meanwhile, so
        # a consumer that went away can never hold a slot (a generator waits at a yield until it is read).
        self.admitted += 1
        try:
            opened = await self._open_stream(request, key)
        finally:
            self.admitted -= 1
        if isinstance(opened, dict):  # a refusal
            yield opened
            return
        plan, events, first, failover = opened
        model = request["model"]
        yield {"meta": self._meta(plan, failover)}
        ttft = time.perf_counter() - began
        last, text = first, [first["delta"]]
        yield first
        try:
            while "finish_reason" not in last:
                event = await _next(events, self._timeout())
                text.append(event["delta"])
                last = event
                yield event
        except StopAsyncIteration:
            pass
        except asyncio.CancelledError:
            events.cancel()
            raise
        except Exception as exc:
            self.stats.error(self._label(model), "stream_" + type(exc).__name__)
            logger.warning("stream failed after %d events (%s)", len(text), _describe(exc))
            yield _refusal(503, f"The model failed while streaming ({_describe(exc)}).", "model_unavailable")
            return
        if "finish_reason" in last:
            self._after(request, plan, last | {"text": "".join(text)}, failover, began, ttft, key)

    async def _open_stream(self, request: dict, key: str | None) -> dict | tuple:
        """A refusal (dict), or (plan, events, first event, failover): the guard's verdict, then the
        primary's stream up to its first event, or the backup's when the primary fails before it."""
        refusal, plan = await self._begin(request, key)
        if refusal:
            return refusal
        payload, model = plan["payload"], request["model"]
        events = self.primary.options(multiplexed_model_id=payload["adapter"], stream=True).stream.remote(payload)
        try:
            return (plan, events, await _next(events, self._timeout()), False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, PromptError):
                return _refusal(400, str(exc).strip().splitlines()[-1], "context_length_exceeded", "messages")
            if isinstance(exc, ModelRequestError):  # refused by the model deployment: no failover
                return _model_refusal(exc)
            if _is_backpressure(exc):
                return self._busy(model)
            refused = self._no_failover(payload, exc, model)
            if refused:
                return refused
            logger.warning("primary failed before its first token (%s); streaming from the backup", _describe(exc))
        events = self.backup.options(stream=True).stream.remote(payload | {"adapter": BASE})
        try:
            return (plan, events, await _next(events, self._timeout()), True)
        except asyncio.CancelledError:
            raise
        except Exception as backup_exc:
            return self._backup_failed(model, backup_exc)

    async def _failover(self, payload: dict, exc: Exception, model: str) -> dict:
        refused = self._no_failover(payload, exc, model)
        if refused:
            return refused
        logger.warning("primary failed on adapter %s (%s); the backup answers", payload["adapter"], _describe(exc))
        try:
            return await _call(self.backup.generate.remote(payload | {"adapter": BASE}), self._timeout())
        except asyncio.CancelledError:
            raise
        except Exception as backup_exc:
            return self._backup_failed(model, backup_exc)

    def _no_failover(self, payload: dict, exc: Exception, model: str) -> dict | None:
        """Counts the primary's failure; the 503 when the backup cannot take over (none is configured, or it
        cannot honour the request's options), None when it can."""
        self.stats.error(self._label(model), "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__)
        if self.backup is None:
            return _refusal(
                503, f"The model failed ({_describe(exc)}) and no backup is configured.", "model_unavailable"
            )
        return self._backup_unable(payload, exc)

    def _backup_failed(self, model: str, exc: Exception) -> dict:
        """The answer when the backup failed too: 429 when it was only full, 503 otherwise."""
        self.stats.error(self._label(model), "backup_" + type(exc).__name__)
        if _is_backpressure(exc):
            return self._busy(model)
        return _refusal(503, f"The model and its backup both failed ({_describe(exc)}).", "model_unavailable")

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
            "guard_score": plan["guard_score"] if self.spec.get("expose_guard_score") else None,
        }

    def _after(self, request, plan, result, failover, began, ttft, key) -> None:
        """Count the answered request, then shadow and measure drift in the background."""
        adapter = plan["payload"]["adapter"]
        self.stats.request(
            self._label(request["model"]),
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
        if len(self.background) >= self.spec.get("max_background", 16):
            coroutine.close()  # never started: nothing to cancel
            self.stats.background_skipped()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)  # keep a reference until done (the loop holds tasks weakly)
        task.add_done_callback(self.background.discard)

    async def _shadow(self, payload: dict, champion_text: str) -> None:
        try:
            copy = payload | {"adapter": self.spec["challenger"]}
            call = self.primary.options(multiplexed_model_id=copy["adapter"]).generate.remote(copy)
            result = await _call(call, self._timeout())
            self.monitor.add_comparison(champion_text, result["text"])
        except Exception as exc:
            logger.warning("shadow request to the challenger failed: %s", _describe(exc))

    async def _measure(self, prompt_ids: list[int], reply_ids: list[int]) -> None:
        if not (self.shadow or self.canary > 0):
            return  # rolled back while this was queued
        try:
            challenger = self.spec["challenger"]
            call = self.primary.options(multiplexed_model_id=challenger).divergence.remote(
                prompt_ids, reply_ids, self.spec["champion"], challenger
            )
            measured = await _call(call, self._timeout())
        except Exception as exc:
            logger.warning("drift measurement failed: %s", _describe(exc))
            return
        if self.monitor.add(measured["kl"], measured["top1_agreement"]) and (self.shadow or self.canary > 0):
            await self._roll_back()

    # ------------------------------------------------------------------------------ rollback

    def _set_pending(self, pending: bool) -> None:
        self.rollback_pending = pending
        self.stats.rollback_pending(pending)

    @property
    def _rollout(self) -> Rollout:
        # Only a router with a challenger rolls back, and that router made its Rollout when it started.
        if self.rollout is None:
            raise RuntimeError("this router has no challenger to roll back")
        return self.rollout

    async def _roll_back(self) -> None:
        summary = self.monitor.summary()
        challenger = self.spec["versions"].get(self.spec["challenger"], self.spec["challenger"])
        self.canary, self.shadow = 0.0, False
        mean = summary["mean_kl"]
        shown = "not finite" if mean is None or not math.isfinite(mean) else f"{mean:.4f}"
        reason = f"mean KL {shown} > {summary['threshold']} over {summary['samples']} requests"
        event = {
            "time": time.time(),
            "event": "rollback",
            "challenger": challenger,
            "reason": reason,
            "drift": summary,
            "registry": None,
        }
        self.events.append(event)
        wants_move = bool(self.spec.get("challenger_registry") and self.spec["drift"]["rollback"])
        if wants_move:
            event["registry"] = {"moved": False, "why": "pending"}
            self._set_pending(True)
        await asyncio.get_running_loop().run_in_executor(None, self._rollout.remember, event)
        logger.warning("challenger %s rolled back: %s", challenger, reason)
        if wants_move:
            await self._move_alias(event)
            if self.rollback_pending:
                self._spawn_retry(event)

    async def _move_alias(self, event: dict) -> None:
        loop = asyncio.get_running_loop()
        try:
            event["registry"] = await loop.run_in_executor(None, self._rollout.move_alias, event["reason"])
        except Exception as exc:
            event["registry"] = {"moved": False, "why": _describe(exc), "pending": True}
            logger.warning("moving the challenger alias back failed (%s); retrying", _describe(exc))
            await loop.run_in_executor(None, self._rollout.remember, event)
            return
        self._set_pending(False)
        await loop.run_in_executor(None, self._rollout.remember, event)
        logger.warning("challenger alias: %s", event["registry"])

    def _spawn_retry(self, event: dict) -> None:
        async def retry():
            while self.rollback_pending:
                await asyncio.sleep(self.spec.get("rollback_retry_s", 30.0))
                await self._move_alias(event)

        # Not through _spawn: the cap on background work must never drop the retry.
        self._retry_task = asyncio.get_running_loop().create_task(retry())

    async def _ensure_retry(self) -> None:
        """A router started with a rollback still pending (restored from the GCS) retries it."""
        if self._retry_later and self.events:
            self._retry_later = False
            self._spawn_retry(self.events[-1])

    # ------------------------------------------------------------------------------ counters

    async def client_error(self, model: str, code: str) -> None:
        await self._ensure_retry()
        self.stats.error(self._label(model), code)

    async def auth_failure(self) -> None:
        self.stats.auth_failure()

    async def shed_unread(self, count: int) -> None:
        """Requests an ingress refused past its admission share, before reading them (no model known)."""
        self.stats.shed_unread(count)

    async def health(self) -> dict:
        """What each deployment this router depends on answers, each within a few seconds."""
        await self._ensure_retry()
        checks = {"llm": self.primary}
        if self.backup is not None:
            checks["backup"] = self.backup
        if self.guard is not None:
            checks["guard"] = self.guard

        async def probe(handle):
            try:
                await _call(handle.info.remote(), 5.0)
                return "ok"
            except Exception as exc:
                return "busy" if _is_backpressure(exc) else f"failing ({type(exc).__name__})"

        names = list(checks)
        answers = await asyncio.gather(*(probe(checks[n]) for n in names))
        return {"router": "ok", **dict(zip(names, answers))}

    async def summary(self) -> dict:
        await self._ensure_retry()
        expose = self.spec.get("expose_guard_score")
        try:
            primary = await _call(self.primary.info.remote(), 10.0)
        except Exception as exc:
            primary = {"error": _describe(exc)}
        guard = None
        if self.guard is not None:
            try:
                guard = await _call(self.guard.info.remote(), 10.0)
                guard = guard if expose else {"model": guard["model"]}
            except Exception as exc:
                guard = {"error": _describe(exc)}
        return self.stats.summary() | {
            "routing": {
                "name": self.spec["name"],
                "champion": self._served_name(self.spec["champion"], False),
                "challenger": self._served_name(self.spec["challenger"], False) if self.spec["challenger"] else None,
                "canary_percent": self.canary,
                "shadow": self.shadow,
                "backup": self.backup is not None,
                "rollback_pending": self.rollback_pending,
            },
            "drift": self.monitor.summary(),
            "events": self.events,
            "llm": primary,
            "guard_model": guard,
            "guard_mode": self.spec["guard_mode"] if self.guard is not None else "off",
        }
