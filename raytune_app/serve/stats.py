"""Serving counters: one place that records every request, guard decision and failure, and both keeps a
JSON summary (GET /v1/stats) and exports Prometheus metrics through Ray's metrics API.

With `export=False` it is plain Python (unit tests); the router builds it with `export=True`, so the
metrics appear on every node's Ray metrics endpoint (scraped by Prometheus; Ray's Grafana dashboards
pick them up) under the `raytune_` prefix.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque

# The model label of requests refused before their body was read (an ingress at capacity): no model id known.
UNREAD = "unread"
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


def _percentiles(values) -> dict:
    import numpy as np

    if not values:
        return {"p50": None, "p99": None}
    # One pass for both (an array result: numpy's stubs type a scalar percentile as not iterable).
    p50, p99 = np.asarray(np.percentile(list(values), [50, 99]), dtype=float)
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4)}


class Stats:
    def __init__(self, pricing: dict, export: bool = False, window: int = 2000, models: list[str] | None = None):
        self.pricing = pricing
        # Metric labels: the served model ids (the router maps anything else to one `unknown` label before it
        # gets here), so a client cannot grow the label set by sending made-up names.
        self.models = set(models) if models is not None else None
        self.started = time.time()
        self.requests: Counter = Counter()  # (model, status) -> n
        self.tokens: defaultdict[str, dict[str, int]] = defaultdict(lambda: {"prompt": 0, "completion": 0})
        self.cost: Counter = Counter()
        self.latency: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.ttft: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.served_by: Counter = Counter()
        self.failovers = 0
        self.errors: Counter = Counter()
        self.guard_decisions: Counter = Counter()
        self.guard_latency: deque = deque(maxlen=window)
        self.auth_failures = 0
        self.by_key: Counter = Counter()
        self.skipped_background = 0
        self.shed_unread_total = 0
        self.pending_rollback = False
        self.prometheus = _Prometheus() if export else None

    def _model(self, model: str) -> str:
        if self.models is None or model in self.models:
            return model
        raise ValueError(f"model label {model!r} is not one of the served ids; map it to `unknown` first")

    def price(self, model: str) -> dict:
        return self.pricing.get(model) or self.pricing.get("*") or {"prompt_per_1k": 0.0, "completion_per_1k": 0.0}

    def request(
        self,
        model: str,
        served_by: str,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        ttft_s: float | None,
        failover: bool,
        key: str | None,
    ) -> None:
        model = self._model(model)
        price = self.price(model)
        cost = prompt_tokens / 1000 * price["prompt_per_1k"] + completion_tokens / 1000 * price["completion_per_1k"]
        self.requests[(model, "ok")] += 1
        self.tokens[model]["prompt"] += prompt_tokens
        self.tokens[model]["completion"] += completion_tokens
        self.cost[model] += cost
        self.latency[model].append(latency_s)
        if ttft_s is not None:
            self.ttft[model].append(ttft_s)
        self.served_by[served_by] += 1
        self.failovers += failover
        if key:
            self.by_key[key] += 1
        if self.prometheus:
            self.prometheus.request(
                model, served_by, prompt_tokens, completion_tokens, cost, latency_s, ttft_s, failover, key
            )

    def error(self, model: str, kind: str) -> None:
        model = self._model(model)
        self.requests[(model, "error")] += 1
        self.errors[kind] += 1
        if self.prometheus:
            self.prometheus.errors.inc(tags={"model": model, "kind": kind})

    def shed_unread(self, count: int) -> None:
        """`count` requests refused at capacity by an ingress before their body (and model id) was read."""
        if count < 1:
            return
        self.errors["shed"] += count
        self.shed_unread_total += count
        if self.prometheus:
            self.prometheus.errors.inc(count, tags={"model": UNREAD, "kind": "shed"})

    def background_skipped(self) -> None:
        """A shadow copy or drift measurement not started: too many already in flight."""
        self.skipped_background += 1
        if self.prometheus:
            self.prometheus.skipped.inc()

    def rollback_pending(self, pending: bool) -> None:
        """A rollback decided whose registry alias move has not succeeded yet (being retried)."""
        self.pending_rollback = pending
        if self.prometheus:
            self.prometheus.pending.set(1 if pending else 0)

    def guard(self, decision: str, latency_s: float) -> None:
        """`decision`: passed | blocked | flagged (monitor mode: would have been blocked) | error."""
        self.guard_decisions[decision] += 1
        self.guard_latency.append(latency_s)
        if self.prometheus:
            self.prometheus.guard.inc(tags={"decision": decision})
            self.prometheus.guard_latency.observe(latency_s)

    def auth_failure(self) -> None:
        self.auth_failures += 1
        if self.prometheus:
            self.prometheus.auth_failures.inc()

    def summary(self) -> dict:
        models = sorted({m for m, _ in self.requests} | set(self.tokens))
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "models": {
                m: {
                    "requests": self.requests[(m, "ok")],
                    "errors": self.requests[(m, "error")],
                    "prompt_tokens": self.tokens[m]["prompt"],
                    "completion_tokens": self.tokens[m]["completion"],
                    "cost": round(self.cost[m], 6),
                    "latency_s": _percentiles(self.latency[m]),
                    "ttft_s": _percentiles(self.ttft[m]),
                }
                for m in models
            },
            "served_by": dict(self.served_by),
            "failovers": self.failovers,
            "errors": dict(self.errors),
            "shed_unread": self.shed_unread_total,
            "guard": {
                **dict(self.guard_decisions),
                "latency_ms": {
                    k: (None if v is None else round(v * 1000, 3)) for k, v in _percentiles(self.guard_latency).items()
                },
            },
            "auth_failures": self.auth_failures,
            "requests_by_key": dict(self.by_key),
            "background_skipped": self.skipped_background,
            "rollback_pending": self.pending_rollback,
        }


class _Prometheus:
    """The same counts as Ray metrics (Prometheus format on each node's metrics export port)."""

    def __init__(self):
        from ray.serve.metrics import Counter as RayCounter
        from ray.serve.metrics import Gauge, Histogram

        self.requests = RayCounter("raytune_requests_total", "Answered requests.", tag_keys=("model", "served_by"))
        self.tokens = RayCounter("raytune_tokens_total", "Tokens in and out.", tag_keys=("model", "direction"))
        self.cost = RayCounter("raytune_cost_total", "Estimated cost (serve.pricing).", tag_keys=("model",))
        self.latency = Histogram(
            "raytune_request_latency_seconds", "Time to the whole reply.", LATENCY_BOUNDARIES, tag_keys=("model",)
        )
        self.ttft = Histogram(
            "raytune_time_to_first_token_seconds",
            "Time to the first streamed token.",
            LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.failovers = RayCounter("raytune_failovers_total", "Requests the backup answered.", tag_keys=("model",))
        self.errors = RayCounter("raytune_errors_total", "Failed requests.", tag_keys=("model", "kind"))
        self.guard = RayCounter("raytune_guard_decisions_total", "Guard decisions.", tag_keys=("decision",))
        self.guard_latency = Histogram("raytune_guard_latency_seconds", "Guard scoring time.", LATENCY_BOUNDARIES)
        self.auth_failures = RayCounter(
            "raytune_auth_failures_total", "Requests refused for a missing or wrong API key."
        )
        self.by_key = RayCounter("raytune_requests_by_key_total", "Requests per API key id.", tag_keys=("key",))
        self.skipped = RayCounter(
            "raytune_background_skipped_total", "Shadow copies / drift measurements skipped: too many in flight."
        )
        self.pending = Gauge(
            "raytune_rollback_pending", "1 while a rollback's registry alias move has not succeeded (retried)."
        )
        self.pending.set(0)

    def request(self, model, served_by, prompt_tokens, completion_tokens, cost, latency_s, ttft_s, failover, key):
        self.requests.inc(tags={"model": model, "served_by": served_by})
        # Ray counters refuse increments of zero.
        for direction, count in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if count > 0:
                self.tokens.inc(count, tags={"model": model, "direction": direction})
        if cost > 0:
            self.cost.inc(cost, tags={"model": model})
        self.latency.observe(latency_s, tags={"model": model})
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags={"model": model})
        if failover:
            self.failovers.inc(tags={"model": model})
        if key:
            self.by_key.inc(tags={"key": key})
