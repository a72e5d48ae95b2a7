"""Drift between champion and challenger: a sliding window over per-request measurements.

Each measured request contributes the mean KL(champion || challenger) of the two models' next-token
distributions along the served reply (transformers backend: over the whole vocabulary,
raytune_app/serve/engine.py `Engine.divergence`; vLLM backend: from each model's top-k logprobs,
`top_k_kl` below), their top-1 agreement, and (in shadow mode) whether the two replies were identical
and their length ratio. Once
`min_samples` requests are in the window, a window mean KL above `threshold` trips the monitor.
Pure Python; the router owns one and acts on `tripped`.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import fmean


def top_k_kl(reference: list[dict], candidate: list[dict]) -> dict:
    """Mean KL(reference || candidate) along a reply when each model gives only its top-k logprobs per
    position (vLLM returns at most 20): `reference[i]` / `candidate[i]` map token -> logprob at position
    i, each holding that model's top-k and the served token.

    Both distributions are coarsened to the tokens whose probability both models report (always at least
    the served token) plus one bucket for all other tokens, and the KL of the coarsened pair is taken.
    Coarsening never increases KL (data-processing inequality), so this is a lower bound of the
    full-vocabulary KL, equal to it when the top-k cover both supports; two identical models measure 0.
    Returns the mean KL, the share of positions where the top tokens agree, and the positions counted.
    """
    kls, agree = [], []
    for p, q in zip(reference, candidate):
        if not p or not q:
            continue
        shared = set(p) & set(q)
        p_known = {t: math.exp(p[t]) for t in shared}
        q_known = {t: math.exp(q[t]) for t in shared}
        kl = sum(pt * (math.log(pt) - math.log(max(q_known[t], 1e-30))) for t, pt in p_known.items() if pt > 0)
        p_rest = max(0.0, 1.0 - sum(p_known.values()))
        q_rest = max(1e-30, 1.0 - sum(q_known.values()))
        if p_rest > 1e-12:
            kl += p_rest * (math.log(p_rest) - math.log(q_rest))
        kls.append(max(0.0, kl))
        agree.append(max(p, key=p.__getitem__) == max(q, key=q.__getitem__))
    if not kls:
        return {"kl": 0.0, "top1_agreement": 1.0, "positions": 0}
    return {"kl": fmean(kls), "top1_agreement": fmean(agree), "positions": len(kls)}


class DriftMonitor:
    def __init__(self, threshold: float, window: int, min_samples: int):
        self.threshold, self.min_samples = threshold, min(min_samples, window)
        self.kl: deque = deque(maxlen=window)
        self.agreement: deque = deque(maxlen=window)
        self.same_reply: deque = deque(maxlen=window)
        self.length_ratio: deque = deque(maxlen=window)
        self.measured = 0
        self.non_finite = 0

    def add(self, kl: float, top1_agreement: float) -> bool:
        """Record one request's divergence; True when the window now passes the threshold. A KL that is not
        a finite number (NaN or inf logits from a broken challenger) counts as infinitely far: it trips
        the monitor rather than silently poisoning the mean (NaN compares false with every threshold)."""
        if not math.isfinite(kl):
            kl = math.inf
            self.non_finite += 1
        self.kl.append(kl)
        self.agreement.append(top1_agreement if math.isfinite(top1_agreement) else 0.0)
        self.measured += 1
        return self.tripped

    def add_comparison(self, champion_reply: str, challenger_reply: str) -> None:
        """Output statistics of a shadowed request: identical replies and the length ratio."""
        self.same_reply.append(champion_reply == challenger_reply)
        self.length_ratio.append(len(challenger_reply) / max(1, len(champion_reply)))

    @property
    def mean_kl(self) -> float | None:
        return fmean(self.kl) if self.kl else None

    @property
    def tripped(self) -> bool:
        return len(self.kl) >= self.min_samples and fmean(self.kl) > self.threshold

    def reset(self) -> None:
        for window in (self.kl, self.agreement, self.same_reply, self.length_ratio):
            window.clear()

    def summary(self) -> dict:
        def mean(values):  # JSON has no inf: a window holding a non-finite KL reports null (see non_finite)
            return round(fmean(values), 6) if values and math.isfinite(fmean(values)) else None

        return {
            "threshold": self.threshold,
            "window": self.kl.maxlen,
            "samples": len(self.kl),
            "measured_total": self.measured,
            "non_finite": self.non_finite,
            "mean_kl": mean(self.kl),
            "top1_agreement": mean(self.agreement),
            "shadow_compared": len(self.same_reply),
            "shadow_identical_rate": mean(self.same_reply),
            "shadow_length_ratio": mean(self.length_ratio),
        }
