"""Batched generation for evaluation: the model replica a Ray Data actor pool runs.

    ds.map_batches(Generator, fn_constructor_kwargs={...}, compute=ray.data.ActorPoolStrategy(size=n),
                   batch_size=16, batch_format="pyarrow")

Each actor loads the base model once (and merges a LoRA adapter into it, so generation runs at the
base model's speed), then for every batch renders the prompts with the chat template, left-pads them
and generates greedily (or samples at `temperature`). For classification it also scores every label
as a continuation of the prompt, giving the label probabilities ECE is computed from.

Columns in: `prompt` (list of {role, content} messages). Columns added: `prediction`, `new_tokens`,
`latency_s` (time of the generate call that produced the row), `batch_start`, `batch_end` (wall
clock, for tokens/s over the whole pool), `node` (the Ray node id of the replica: where the pool's replicas
ran on a multi-node cluster, reported in metrics.json) and, for classification, `label_probs`.
"""

from __future__ import annotations

import time

import pyarrow as pa

from raytune_app import integrity, storage


def with_shots(messages: list[dict], shots: list[dict]) -> list[dict]:
    """The chat with the few-shot turns `shots` (user / assistant messages) after its leading system messages."""
    if not shots:
        return messages
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return [*messages[:head], *shots, *messages[head:]]


def load_model(model: dict, weights: str | None, device: str, dtype: str):
    """(model, tokenizer) in eval mode: the base, a full fine-tune (`weights` holds a model), or the
    base with a LoRA adapter merged in (`weights` holds adapter_config.json); raytune_app/models.py's
    loader, the one serving uses too."""
    from raytune_app import models

    tokenizer = models.load_tokenizer(
        model["path"], model.get("tokenizer"), model.get("chat_template"), model.get("trust_remote_code", False)
    )
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if weights:  # never evaluate weights cut short by a crash: name the file instead
        integrity.check_weights(storage.local_dir(weights), f"the weights in {weights}")
    return models.load_causal_lm(model, weights, device, dtype), tokenizer


class Generator:
    """One model replica. Constructed by Ray Data once per actor; called once per batch."""

    def __init__(
        self,
        model: dict,
        weights: str | None,
        max_new_tokens: int,
        temperature: float = 0.0,
        dtype: str = "fp32",
        threads: int | None = None,
        labels: list[str] | None = None,
        prompt_prefix: str = "",
        shots: list[dict] | None = None,
    ):
        import ray
        import torch

        from raytune_app import models

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = dtype = models.compute_precision(dtype, self.device == "cuda")
        self.model, self.tokenizer = load_model(model, weights, self.device, dtype)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.labels = labels
        self.prompt_prefix = prompt_prefix  # put before the last user message (a distilled student's task prefix)
        self.shots = shots or []  # few-shot turns before the prompt (the base model: evaluate.base_shots)
        # Stop at the end of the assistant turn; some templates end a turn with a token other than eos.
        self.stop_ids = models.stop_token_ids(self.tokenizer)

    def _autocast(self):
        import torch

        enabled = self.dtype in ("bf16", "fp16")
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float16
        return torch.autocast(self.device if self.device == "cpu" else "cuda", dtype=dtype, enabled=enabled)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        prompts = [
            self.tokenizer.apply_chat_template(
                with_shots(self._prefixed(messages), self.shots), tokenize=False, add_generation_prompt=True
            )
            for messages in batch.column("prompt").to_pylist()
        ]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        start = time.time()
        with torch.inference_mode(), self._autocast():
            output = self.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        end = time.time()
        generated = output[:, encoded["input_ids"].shape[1] :].cpu()
        texts, counts = [], []
        for row in generated.tolist():
            # Tokens up to and including the first stop token are the reply; the rest is padding.
            length = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            counts.append(length)
            texts.append(self.tokenizer.decode(row[:length], skip_special_tokens=True).strip())
        n = len(texts)
        columns = {
            "prediction": pa.array(texts, pa.string()),
            "new_tokens": pa.array(counts, pa.int64()),
            "latency_s": pa.array([end - start] * n, pa.float64()),
            "batch_start": pa.array([start] * n, pa.float64()),
            "batch_end": pa.array([end] * n, pa.float64()),
            "node": pa.array([self.node] * n, pa.string()),
        }
        if self.labels:
            columns["label_probs"] = pa.array(self.label_probabilities(prompts), pa.list_(pa.float64()))
        for name, values in columns.items():
            batch = batch.append_column(name, values)
        return batch

    def _prefixed(self, messages: list[dict]) -> list[dict]:
        from raytune_app.distill.parse import prefix_last_user

        return prefix_last_user(messages, self.prompt_prefix) if self.prompt_prefix else messages

    def label_probabilities(self, prompts: list[str]) -> list[list[float]]:
        """P(label | prompt) over the task's labels: each label's summed token log-probability as a
        continuation of the prompt, normalised over the labels (a softmax of the sums)."""
        import torch

        if not self.labels:
            raise ValueError("label scoring needs the task's labels (data.labels in the recipe)")
        scores = torch.zeros(len(prompts), len(self.labels))
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        pad = self.tokenizer.pad_token_id
        for j, label in enumerate(self.labels):
            label_ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
            rows = [ids + label_ids for ids in prompt_ids]
            width = max(map(len, rows))
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            with torch.inference_mode(), self._autocast():
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits.float()
            # The label occupies the last len(label_ids) positions; each is predicted one step earlier.
            log_probs = torch.log_softmax(logits[:, -len(label_ids) - 1 : -1], dim=-1)
            targets = input_ids[:, -len(label_ids) :].unsqueeze(-1)
            scores[:, j] = log_probs.gather(-1, targets).squeeze(-1).sum(-1).cpu()
        return torch.softmax(scores, dim=-1).tolist()
