"""Multi-task loss for Distilling Step-by-Step: L = L_label + lambda * L_rationale.

Each example's loss is its mean token cross-entropy over the answer tokens (labels != -100), weighted
by its task's weight (1 for `[label]` rows, lambda for `[rationale]` rows), averaged over the batch.
Averaging per example first keeps a long rationale from outweighing a short label by its length alone.
`weighted_lm_loss` is a plain function (tested by hand); `multitask_trainer` wires it into TRL's
SFTTrainer, whose loss stays untouched for batches without weights (validation, label-only runs).
"""

from __future__ import annotations


def weighted_lm_loss(logits, labels, weights):
    """Mean over examples of weight x (mean next-token cross-entropy over the example's answer tokens)."""
    import torch.nn.functional as F

    shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
    tokens = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none")
    answer = (shifted_labels != -100).float()
    per_example = (tokens * answer).sum(1) / answer.sum(1).clamp(min=1.0)
    return (per_example * weights.to(per_example.dtype)).mean()


class KeepWeights:
    """Wraps TRL's collator: takes each example's `loss_weight` out before collating, adds them back as a tensor."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        import torch

        weights = [example.pop("loss_weight", None) for example in examples]
        batch = self.inner(examples)
        if None not in weights:  # validation batches carry none: TRL's own loss applies there
            batch["loss_weight"] = torch.tensor(weights, dtype=torch.float32)
        return batch


def multitask_trainer(base):
    """A subclass of TRL's trainer class `base` whose loss honours `loss_weight` when a batch carries it."""

    class MultiTaskTrainer(base):  # type: ignore[valid-type,misc]  # the base is chosen at run time
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("loss_weight", None)
            if weights is None:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            labels = inputs.pop("labels")
            outputs = model(**{k: v for k, v in inputs.items()}, use_cache=False)
            loss = weighted_lm_loss(outputs.logits, labels, weights)
            return (loss, outputs) if return_outputs else loss

    return MultiTaskTrainer
