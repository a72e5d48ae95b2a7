"""The guard deployment: the trained prompt-injection classifier (raytune_app/guard) behind `@serve.batch`.

    spec = {"folder": <registry URI or folder>, "tracking_uri": uri, "threshold": None | float,
            "max_batch_size": 16, "batch_wait_timeout_s": 0.005}

`score(text)` returns {"score": p(attack), "threshold": t, "attack": score >= t}; concurrent prompts are
scored in one forward pass. The router decides what a score means (enforce / monitor). The guard scores
with the precision its guard.json names (int8 by default: the fast CPU path, the one its threshold was
chosen on); a prompt batched with others can score marginally differently from alone, since int8
activations share one quantisation scale per batch.
"""

from __future__ import annotations

import asyncio

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
class GuardScorer:
    def __init__(self, spec: dict):
        from raytune_app.guard.model import Guard
        from raytune_app.registry import store

        folder = spec["model"]
        if folder.startswith("models:/"):
            folder = store.download(spec["tracking_uri"], folder)
        self.guard = Guard.load(folder, threads=1)
        self.threshold = spec["threshold"] if spec.get("threshold") is not None else self.guard.threshold
        self.version = spec.get("version", folder)
        self._score_batch.set_max_batch_size(spec["max_batch_size"])
        self._score_batch.set_batch_wait_timeout_s(spec["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, texts: list[str]) -> list[float]:
        return await asyncio.get_running_loop().run_in_executor(None, self.guard.scores, texts)

    async def score(self, text: str) -> dict:
        score = await self._score_batch(text)
        return {"score": round(float(score), 6), "threshold": self.threshold, "attack": score >= self.threshold}

    async def info(self) -> dict:
        return {"model": self.version, "threshold": self.threshold}
