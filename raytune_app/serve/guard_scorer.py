"""The guard deployment: the trained prompt-injection classifier (raytune_app/guard) behind `@serve.batch`.

    spec = {"model": <registry URI or folder>, "tracking_uri": uri, "threshold": None | float,
            "max_batch_size": 16, "batch_wait_timeout_s": 0.005, "window_overlap": 0.5, "max_windows": 256,
            "cache_windows": 4096, "compile": True, "stall_timeout_s": 120}

`score(segments)` reads a whole prompt: `segments` are its messages' texts, newest first (ingress:
serve/inputs.py), each normalised and cut into overlapping windows of the guard's max length (the
tokenizer's overflow windows, guard/model.py `window_ids`); every window is scored and the prompt's
score is its worst window's: {"score", "threshold", "attack", "windows", "segment" (index of the worst),
"over_limit"}. A prompt with more than `max_windows` windows is not scored past the newest `max_windows`
and says `over_limit` (the router refuses it in enforce mode). Concurrent requests are batched: their
windows share forward passes of up to `max_batch_size` windows, and windows read before are looked up
(`cache_windows`, guard/model.py WindowCache: history and system prompts cost nothing the second time).
A prompt that fits one window scores
exactly as before windows existed (the same tokens as truncation gives). The router decides what a
score means.

The guard scores with the precision it picks for this CPU among those its guard.json has thresholds for
(guard/model.py `preferred_path`: bf16 where the CPU computes it natively, compiled at start when
`compile`; else int8), with that precision's threshold; a window batched with others can score marginally
differently from alone (int8 activations share one quantisation scale per batch; bf16 rounds differently
in another batch shape). `check_health` fails when a scoring
batch has stalled (serve/heartbeat.py), so Serve replaces a wedged guard replica.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve

from raytune_app.guard.model import WindowCache
from raytune_app.serve.heartbeat import Heartbeat


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
class GuardScorer:
    def __init__(self, spec: dict):
        from raytune_app.guard.model import Guard
        from raytune_app.registry import store

        folder = spec["model"]
        if folder.startswith("models:/"):
            folder = store.download(spec["tracking_uri"], folder)
        self.guard = Guard.load(folder, threads=1, compile=spec.get("compile", False))
        self.threshold = spec["threshold"] if spec.get("threshold") is not None else self.guard.threshold
        self.version = spec.get("version", folder)
        self.overlap = spec.get("window_overlap", 0.5)
        self.max_windows = spec.get("max_windows", 256)
        self.per_pass = spec["max_batch_size"]
        self.heartbeat = Heartbeat(spec.get("stall_timeout_s", 120.0))
        size = spec.get("cache_windows", 4096)
        self.cache = WindowCache(size) if size else None
        self.windows_read = 0
        self._score_batch.set_max_batch_size(spec["max_batch_size"])
        self._score_batch.set_batch_wait_timeout_s(spec["batch_wait_timeout_s"])

    def _score_requests(self, requests: list[list[str]]) -> list[dict]:
        """Worst window per request; all requests' windows go through the model together."""
        with self.heartbeat.working("scoring"):
            # One tokenizer call for every segment of every request; segments come newest first, so a request
            # over max_windows has its newest messages read.
            texts = [text for segments in requests for text in segments]
            request_of = [index for index, segments in enumerate(requests) for _ in segments]
            first = [sum(len(r) for r in requests[:index]) for index in range(len(requests))]
            ids, text_of = self.guard.windows(texts, self.overlap)
            owners, windows = [], []
            results: list[dict[str, Any]] = [{"windows": 0, "over_limit": False} for _ in requests]
            for window, text in zip(ids, text_of):
                index = request_of[text]
                results[index]["windows"] += 1
                if results[index]["windows"] > self.max_windows:
                    results[index]["over_limit"] = True
                    continue
                owners.append((index, text - first[index]))
                windows.append(window)
            scores = self.guard.score_windows(windows, self.per_pass, self.cache, on_batch=self.heartbeat.beat)
            self.windows_read += len(windows)
        for result in results:
            result |= {"score": 0.0, "segment": 0}
        for (index, segment), score in zip(owners, scores):
            if score > results[index]["score"]:
                results[index] |= {"score": score, "segment": segment}
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[list[str]]) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(None, self._score_requests, requests)

    async def score(self, segments: list[str] | str) -> dict:
        if isinstance(segments, str):
            segments = [segments]
        found = await self._score_batch(list(segments))
        score = round(float(found["score"]), 6)
        return found | {"score": score, "threshold": self.threshold, "attack": score >= self.threshold}

    async def info(self) -> dict:
        return {
            "model": self.version,
            "threshold": self.threshold,
            "max_length": self.guard.max_length,
            "windows_read": self.windows_read,
            "cache": None if self.cache is None else {"hits": self.cache.hits, "misses": self.cache.misses},
            "pid": os.getpid(),
        }

    async def check_health(self) -> None:
        self.heartbeat.check()
