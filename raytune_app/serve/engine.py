"""The generation engine a serving replica runs: one base causal LM, any number of LoRA adapters loaded
beside it, and batched generation where every row names its own adapter and sampling settings.

    engine = Engine({"path": "bundled:smollm2-135m-instruct"})
    engine.add_adapter("champion", "/path/to/adapter")
    rows = [Row(prompt_ids=engine.chat_ids(messages), adapter="champion", max_tokens=64)]
    engine.generate(rows, on_step=print)      # on_step gets one token id (or None) per row, per step

Generation is transformers' own `generate` (KV cache, left padding, position ids from the attention
mask), so a row answers exactly as it would alone; what this file adds is per-row stopping (each
request's `max_tokens` and stop strings), per-row greedy-or-sampled decoding, and a streamer that
hands every step's tokens for the whole batch to the caller, which turns them into text deltas.
PEFT's mixed-adapter batches (`adapter_names=`) keep the base weights shared: adapters cost only
their own small matrices. No Ray here; the Serve deployment wraps it (raytune_app/serve/llm.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raytune_app import integrity, models, storage
from raytune_app.serve import prompt

BASE = "__base__"  # PEFT's name for "no adapter" inside a mixed-adapter batch


@dataclass
class Row:
    """One request inside a batch."""

    prompt_ids: list[int]
    adapter: str = BASE
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False  # set by the caller when its client went away: the row stops generating


class TextStream:
    """Token ids of one row in, text deltas out: holds back a trailing partial UTF-8 character and any
    text that could still become a stop string, so a stop string is never half-sent."""

    def __init__(self, tokenizer, stop_ids: set[int], stop: list[str], max_tokens: int):
        self.tokenizer, self.stop_ids, self.stop, self.max_tokens = tokenizer, stop_ids, stop, max_tokens
        self.ids: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """The text this token releases ('' when it releases none); sets `finish_reason` when the row ends."""
        if self.done:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._release(self._text(), final=True)
        self.ids.append(token)
        text = self._text()
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.finish_reason = "stop"
                return self._release(text[:at], final=True)
        if len(self.ids) >= self.max_tokens:
            self.finish_reason = "length"
            return self._release(text, final=True)
        return self._release(text, final=False)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _release(self, text: str, final: bool) -> str:
        if not final:
            if text.endswith("\ufffd"):
                return ""  # a multi-byte character is not complete yet
            # Keep back the longest tail that is the start of a stop string.
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


class Engine:
    """A base model with named LoRA adapters, generating for mixed batches."""

    def __init__(self, model: dict, dtype: str = "fp32", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = models.compute_precision(dtype, self.device == "cuda")
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.tokenizer = models.load_tokenizer(
            model["path"], model.get("tokenizer"), model.get("chat_template"), model.get("trust_remote_code", False)
        )
        self.tokenizer.padding_side = "left"
        # The loader evaluation uses too (raytune_app/models.py): fp32 weights on CPU, `dtype` on a GPU.
        self.model = models.load_causal_lm(model, None, self.device, dtype)
        self.adapters: dict[str, str] = {}  # name -> folder
        self.stop_ids = set(models.stop_token_ids(self.tokenizer))
        self.context_length = getattr(self.model.config, "max_position_embeddings", None) or 2048

    # ----------------------------------------------------------------------------------- adapters

    def add_adapter(self, name: str, folder: str) -> None:
        """Load the LoRA adapter in `folder` (a path or URI) under `name`, beside those already loaded."""
        from peft import PeftModel

        local = storage.local_dir(folder)  # an s3:// / gs:// folder is copied here first
        if not os.path.exists(os.path.join(local, "adapter_config.json")):
            raise FileNotFoundError(f"no LoRA adapter at {folder} (adapter_config.json missing)")
        integrity.check_weights(local, f"adapter {name} ({folder})")  # never serve a file cut short
        if name in self.adapters:
            return
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(local, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, local, adapter_name=name)
        self.model.eval()
        self.adapters[name] = folder

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return
        del self.adapters[name]
        if self.adapters:
            self.model.delete_adapter(name)
        else:
            # PEFT refuses to delete the last adapter; unwrapping gives the untouched base model back.
            self.model = self.model.unload()

    def _adapter_kwargs(self, names: list[str]) -> dict:
        for name in names:
            if name != BASE and name not in self.adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
        return {"adapter_names": names} if self.adapters else {}

    # ------------------------------------------------------------------------------------ prompts

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The chat template's tokens with each message's content read as text (serve/prompt.py)."""
        return prompt.chat_ids(self.tokenizer, messages)

    def text_ids(self, text: str) -> list[int]:
        return prompt.text_ids(self.tokenizer, text)

    def stream_for(self, row: Row) -> TextStream:
        return TextStream(self.tokenizer, self.stop_ids, row.stop, row.max_tokens)

    # --------------------------------------------------------------------------------- generation

    def generate(
        self, rows: list[Row], on_step: Callable[[list[int]], None], finished: Callable[[], list[bool]] | None = None
    ) -> dict:
        """Generate for every row; `on_step` receives the new token of each row after every decoding
        step. `finished()` (optional) tells which rows the caller has ended (a stop string), and a row
        whose `cancelled` is set stops too, so that a batch whose rows are all ended stops early.
        Returns {"rescued_rows": n}: sampled rows whose numbers broke and were decoded greedily (RowSampling)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        width = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        attention = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device
        )
        limits = torch.tensor([r.max_tokens for r in rows], device=self.device)

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate passes the prompt first
                    self.first = False
                    return
                on_step(value.reshape(-1).tolist())

            def end(self):
                pass

        class RowLimits(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                done = (ids.shape[1] - width) >= limits
                ended = [r.cancelled for r in rows]
                if finished is not None:
                    ended = [a or b for a, b in zip(ended, finished())]
                return done | torch.tensor(ended, device=ids.device)

        sampling = any(r.temperature > 0 for r in rows)
        options: dict[str, Any] = dict(do_sample=False)
        per_row = RowSampling(rows)
        if sampling:
            # Each row's own temperature / top-p is applied by RowSampling; neutralise the model's defaults.
            options = dict(
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                logits_processor=LogitsProcessorList([per_row]),
            )
        with torch.inference_mode(), self._autocast():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=int(limits.max()),
                eos_token_id=sorted(self.stop_ids),
                pad_token_id=pad,
                streamer=Streamer(),
                stopping_criteria=StoppingCriteriaList([RowLimits()]),
                **options,
                **self._adapter_kwargs([r.adapter for r in rows]),
            )
        return {"rescued_rows": per_row.degraded}

    def _autocast(self):
        import torch

        enabled = self.device == "cpu" and self.dtype != torch.float32
        return torch.autocast("cpu", dtype=self.dtype, enabled=enabled)

    # ------------------------------------------------------------------------------------ drift

    def divergence(self, prompt_ids: list[int], reply_ids: list[int], reference: str, candidate: str) -> dict:
        """How far `candidate`'s next-token distributions are from `reference`'s along one exchange:
        both adapters read the prompt and the served reply (teacher forcing, one batch of two), and
        at every reply position KL(reference || candidate) is taken over the whole vocabulary.
        Returns the mean KL and the share of positions where both models' top token agrees."""
        import torch

        ids = prompt_ids + reply_ids[: max(1, self.context_length - len(prompt_ids))]
        if not reply_ids:
            ids = prompt_ids
        tokens = torch.tensor([ids, ids], device=self.device)
        with torch.inference_mode(), self._autocast():
            logits = self.model(input_ids=tokens, **self._adapter_kwargs([reference, candidate])).logits.float()
        # Positions predicting the reply tokens (and the first one, predicted from the prompt's end).
        start = len(prompt_ids) - 1
        log_p = torch.log_softmax(logits[0, start:], dim=-1)
        log_q = torch.log_softmax(logits[1, start:], dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        agree = (log_p.argmax(-1) == log_q.argmax(-1)).float()
        return {"kl": float(kl.mean()), "top1_agreement": float(agree.mean()), "positions": int(kl.numel())}


class RowSampling:
    """Per-row decoding inside one sampled batch: greedy rows keep only their arg-max token; sampling rows
    are divided by their temperature and cut to their top-p nucleus.

    One row's numbers never fail the batch: a row whose scaled logits are not finite (a temperature so small
    that the division overflows, NaN logits) decodes greedily from its finite logits instead, and a row with
    no finite logit at all gets token 0 alone (torch.multinomial would raise for the whole batch on a NaN
    or all-zero row). `degraded` counts the rows so rescued."""

    def __init__(self, rows: list[Row]):
        self.temperatures = [r.temperature for r in rows]
        self.top_ps = [r.top_p for r in rows]
        self.degraded = 0

    @staticmethod
    def _greedy(row):
        import torch

        finite = torch.isfinite(row)
        keep = torch.full_like(row, float("-inf"))
        keep[torch.where(finite, row, torch.full_like(row, float("-inf"))).argmax() if finite.any() else 0] = 0.0
        return keep

    def __call__(self, input_ids, scores):
        import torch

        out = scores.clone()
        for i, (t, p) in enumerate(zip(self.temperatures, self.top_ps)):
            row = scores[i]
            if t <= 0:
                out[i] = self._greedy(row)
                continue
            row = row / t
            if not torch.isfinite(row.max()) or torch.isnan(row).any():
                self.degraded += 1
                out[i] = self._greedy(scores[i])
                continue
            if p < 1.0:
                order = torch.argsort(row, descending=True)
                cumulative = torch.softmax(row[order], dim=-1).cumsum(-1)
                cut = order[(cumulative - torch.softmax(row[order], dim=-1)) > p]
                row = row.clone()
                row[cut] = float("-inf")
            out[i] = row
        return out
