"""The LLM deployment: one base model per replica, LoRA adapters multiplexed over it, dynamic batching.

Built by raytune_app/serve/app.py from a plan (`spec`):

    {"name": "llm", "model": {...model section...}, "adapters": {key: ref}, "tracking_uri": uri,
     "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_loaded_adapters": 4, "precision": "fp32", "threads": None}

Callers pick the adapter with `handle.options(multiplexed_model_id=key)`, so Serve routes a request to a
replica that already holds that adapter; `@serve.multiplexed` loads it on first use (downloading a
registry version once) and evicts the least recently used beyond `max_loaded_adapters`. Requests
waiting at a replica are grouped by `@serve.batch` (Serve keeps one adapter per batch) and decoded
together by the engine; each request receives its own stream of events:

    {"delta": "text"}                       ... as tokens arrive
    {"delta": "", "finish_reason": "stop" | "length", "prompt_tokens": n, "completion_tokens": m,
     "prompt_ids": [...], "completion_ids": [...], "batch_size": b}        last

`generate` gathers the same events into one reply; `divergence` measures drift between two adapters.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Any

from ray import serve

from raytune_app.serve.engine import BASE, Engine, Row
from raytune_app.serve.heartbeat import Heartbeat
from raytune_app.serve.prompt import PromptError

__all__ = ["LLMServer", "PromptError"]  # PromptError: what the router turns into a 400

logger = logging.getLogger("ray.serve")


class _LoadedAdapter:
    """What the multiplexed loader caches: eviction calls __del__, which unloads the adapter."""

    def __init__(self, server: LLMServer, key: str):
        self.server: LLMServer | None
        self.server, self.key = server, key
        self.generation = server.loads[key]

    def __del__(self):
        # Serve calls this on eviction, and Python again at garbage collection: unload once, and only the
        # load this object stands for (the adapter may have been loaded again since).
        if self.server is not None:
            self.server._unload(self.key, self.generation)
            self.server = None


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class LLMServer:
    def __init__(self, spec: dict):
        from ray.serve.metrics import Histogram

        self.spec = spec
        self.engine = Engine(spec["model"], spec.get("precision", "fp32"), spec.get("threads"))
        self.lock = threading.Lock()  # one of: a batch generating, an adapter loading, a drift measurement
        self.local: dict[str, str] = {}  # adapter key -> local folder (downloaded once)
        self.loads: Counter = Counter()  # adapter key -> times loaded, so a stale eviction is ignored
        self.batch_sizes: Counter = Counter()
        # Tokens decoded for requests still listening (a cancelled row stops counting, and stops decoding),
        # requests cancelled mid-generation, and sampled rows whose numbers had to be rescued (engine.RowSampling).
        self.counts: Counter = Counter()
        self.heartbeat = Heartbeat(spec.get("stall_timeout_s", 120.0))
        self._decode.set_max_batch_size(spec["max_batch_size"])
        self._decode.set_batch_wait_timeout_s(spec["batch_wait_timeout_s"])

        # A plain function, not the bound method: Serve's multiplexing keeps its cache on the decorated object.
        async def load(key: str) -> _LoadedAdapter:
            return await self._load_adapter(key)

        self._load = serve.multiplexed(max_num_models_per_replica=spec["max_loaded_adapters"])(load)
        # Serve's metrics add the deployment / replica / app tags themselves.
        self.batch_histogram = Histogram(
            "raytune_batch_size", description="Requests per LLM forward batch.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )

    # ------------------------------------------------------------------------------- adapters

    async def _load_adapter(self, key: str) -> _LoadedAdapter:
        if key not in self.spec["adapters"]:
            raise KeyError(f"unknown adapter {key!r}")
        await asyncio.get_running_loop().run_in_executor(None, self._ensure_loaded, [key])
        return _LoadedAdapter(self, key)

    def _ensure_loaded(self, keys: list[str]) -> None:
        from raytune_app.registry import store

        for key in keys:
            if key == BASE or key in self.engine.adapters:
                continue
            if key not in self.local:
                ref = self.spec["adapters"][key]
                self.local[key] = store.download(self.spec["tracking_uri"], ref) if ref.startswith("models:/") else ref
            with self.heartbeat.working(f"loading adapter {key}"), self.lock:
                started = time.time()
                self.engine.add_adapter(key, self.local[key])
                self.loads[key] += 1
            logger.info("loaded adapter %s from %s in %.1f s", key, self.spec["adapters"][key], time.time() - started)

    def _unload(self, key: str, generation: int) -> None:
        with self.lock:
            if self.loads[key] != generation:
                return
            self.engine.remove_adapter(key)
        logger.info("unloaded adapter %s (least recently used)", key)

    async def _adapter(self, key: str) -> str:
        if key != BASE:
            await self._load(key)
        return key

    # ----------------------------------------------------------------------------- generation

    def _row(self, payload: dict, adapter: str) -> Row:
        if payload["kind"] == "chat":
            ids = self.engine.chat_ids(payload["messages"])
        else:
            ids = self.engine.text_ids(payload["prompt"])
        # The ingress checked the length with the base model's tokenizer; a backup with another tokenizer, or a
        # context shorter than the ingress assumed, is checked again here.
        context = self.engine.context_length
        limit = min(payload.get("max_prompt_tokens") or context, context - payload["max_tokens"])
        if len(ids) > limit:
            raise PromptError(
                f"This model's context is {context} tokens: the prompt ({len(ids)} tokens) plus max_tokens "
                f"({payload['max_tokens']}) must fit, and prompts may have at most {limit} tokens with it."
            )
        return Row(
            prompt_ids=ids,
            adapter=adapter,
            max_tokens=payload["max_tokens"],
            temperature=payload.get("temperature", 0.0),
            top_p=payload.get("top_p", 1.0),
            stop=payload.get("stop") or [],
        )

    async def stream(self, payload: dict):
        """Events for one request, as the batch it joined decodes. When the caller goes away (its client
        disconnected, or the router gave up and cancelled it), the row is marked cancelled and the batch
        stops decoding it at the next step."""
        row = self._row(payload, await self._adapter(payload.get("adapter", BASE)))
        finished = False
        try:
            async for event in self._decode(row):
                if event is not None:
                    finished = finished or "finish_reason" in event
                    yield event
        finally:
            if not finished:
                row.cancelled = True
                self.counts["cancelled"] += 1

    async def generate(self, payload: dict) -> dict:
        """The whole reply at once (the last event, with the text joined)."""
        parts, last = [], {}
        async for event in self.stream(payload):
            parts.append(event["delta"])
            last = event
        return {**last, "text": "".join(parts)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _decode(self, rows: list[Row]):
        """Decode a batch: yields, per step, one item per request (None: nothing new; StopIteration: done)."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        streams = [self.engine.stream_for(r) for r in rows]
        self.batch_sizes[len(rows)] += 1
        self.batch_histogram.observe(len(rows))

        def step(tokens: list[int]) -> None:
            self.heartbeat.beat()
            self.counts["tokens"] += sum(1 for r, s in zip(rows, streams) if not (r.cancelled or s.done))
            loop.call_soon_threadsafe(steps.put_nowait, tokens)

        def run():
            try:
                self._ensure_loaded(sorted({r.adapter for r in rows}))
                with self.heartbeat.working("decoding"), self.lock:
                    done = self.engine.generate(rows, step, finished=lambda: [s.done for s in streams])
                self.counts["rescued"] += done["rescued_rows"]
                loop.call_soon_threadsafe(steps.put_nowait, None)
            except BaseException as exc:  # handed to the event loop, raised there for every request in the batch
                loop.call_soon_threadsafe(steps.put_nowait, exc)

        worker = loop.run_in_executor(None, run)
        ended = [False] * len(rows)
        while True:
            tokens = await steps.get()
            if isinstance(tokens, BaseException):
                raise tokens
            if tokens is None:
                break
            out: list[Any] = []
            for i, (stream, token) in enumerate(zip(streams, tokens)):
                if rows[i].cancelled and not ended[i]:
                    ended[i] = True  # nobody listens: no more text for it (its caller is gone)
                if ended[i]:
                    out.append(StopIteration)
                    continue
                delta = stream.push(token)
                if stream.done:
                    ended[i] = True
                    out.append(self._final(rows[i], stream, delta, len(rows)))
                else:
                    out.append({"delta": delta} if delta else None)
            yield out
            if all(ended):
                break
        await worker
        if not all(ended):  # generation ended without a stop token for some rows (the context is full)
            yield [
                StopIteration if done else self._final(rows[i], streams[i], "", len(rows), "length")
                for i, done in enumerate(ended)
            ]
        yield [StopIteration] * len(rows)

    @staticmethod
    def _final(row: Row, stream, delta: str, batch_size: int, reason: str | None = None) -> dict:
        return {
            "delta": delta,
            "finish_reason": reason or stream.finish_reason,
            "prompt_tokens": len(row.prompt_ids),
            "completion_tokens": len(stream.ids),
            "prompt_ids": row.prompt_ids,
            "completion_ids": stream.ids,
            "batch_size": batch_size,
        }

    # ---------------------------------------------------------------------------------- drift

    async def divergence(self, prompt_ids: list[int], reply_ids: list[int], reference: str, candidate: str) -> dict:
        """KL(reference || candidate) along one served exchange; both adapters load on this replica."""
        await self._adapter(reference)
        await self._adapter(candidate)

        def measure():
            self._ensure_loaded([reference, candidate])
            with self.heartbeat.working("measuring drift"), self.lock:
                return self.engine.divergence(prompt_ids, reply_ids, reference, candidate)

        return await asyncio.get_running_loop().run_in_executor(None, measure)

    async def info(self) -> dict:
        return {
            "name": self.spec["name"],
            "model": self.spec["model"]["path"],
            "adapters_loaded": sorted(self.engine.adapters),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size": self.spec["max_batch_size"],
            "tokens_generated": self.counts["tokens"],
            "cancelled": self.counts["cancelled"],
            "rescued_rows": self.counts["rescued"],
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s: raising marks the replica unhealthy and Serve
        replaces it. Unhealthy: the engine has had work (a batch, an adapter load, a drift measurement) and
        finished no step of it for stall_timeout_s (a hung device, a hung read of adapter weights...)."""
        self.heartbeat.check()
