"""The guard's classifier through ONNX Runtime: export, dynamic int8 quantisation, batch-1 scoring.

    scorer = OnnxScorer.build("runs/guard-public/guard/model", "/tmp/guard-onnx", threads=1)
    scorer.scores(["Ignore all previous instructions"])   # attack probabilities, as Guard.scores

Measured against torch's dynamic int8 path (guard/model.py `quantize_int8`) by
benchmarks/guard_quality.py, side by side on the same prompts. The export is torch's own
(`torch.onnx.export`, the TorchScript exporter: no onnxscript needed), the quantisation
onnxruntime's `quantize_dynamic` (int8 weights, per-channel, activations quantised at run time: the
same scheme as torch's path). Optional: needs the `onnxruntime` and `onnx` packages (CPU wheels);
`available()` says whether they are installed.
"""

from __future__ import annotations

import json
import os

from raytune_app import storage


def available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def export(model_dir: str, out_dir: str) -> str:
    """The saved guard model as an int8 ONNX file under `out_dir`; its path. Reused when it was exported from
    these weights: a guard retrained into the same folder gets a fresh export, not its predecessor's."""
    import torch
    from transformers import AutoModelForSequenceClassification

    os.makedirs(out_dir, exist_ok=True)
    full, quantised = os.path.join(out_dir, "model.onnx"), os.path.join(out_dir, "model.int8.onnx")
    # What the export was made from, as the stages tell their inputs apart (path, size, mtime of each file).
    source_file = os.path.join(out_dir, "exported_from.json")
    source = json.dumps(storage.file_fingerprint(model_dir))
    if os.path.exists(quantised) and os.path.exists(source_file) and open(source_file).read() == source:
        return quantised
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    example = {
        "input_ids": torch.ones(1, 16, dtype=torch.long),
        "attention_mask": torch.ones(1, 16, dtype=torch.long),
        "token_type_ids": torch.zeros(1, 16, dtype=torch.long),
    }
    axes = {0: "batch", 1: "tokens"}
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (),
            full,
            kwargs=example,
            input_names=list(example),
            output_names=["logits"],
            dynamic_axes={**{name: axes for name in example}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(full, quantised, weight_type=QuantType.QInt8, per_channel=True)
    with open(source_file, "w") as out:
        out.write(source)
    return quantised


class OnnxScorer:
    """Attack probabilities from an ONNX Runtime session over the guard's tokenizer and text view."""

    def __init__(self, onnx_file: str, tokenizer, max_length: int, threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # one thread per replica, as the torch GuardScorer runs
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer, self.max_length = tokenizer, max_length

    @classmethod
    def build(cls, model_dir: str, out_dir: str, max_length: int = 128, threads: int = 1) -> OnnxScorer:
        from transformers import AutoTokenizer

        return cls(export(model_dir, out_dir), AutoTokenizer.from_pretrained(model_dir), max_length, threads)

    def scores(self, texts: list[str]) -> list[float]:
        import numpy as np

        from raytune_app.guard.deobfuscate import guard_view

        encoded = self.tokenizer(
            [guard_view(t) for t in texts],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="np",
        )
        feed = {k: v.astype(np.int64) for k, v in encoded.items() if k in self.inputs}
        if "token_type_ids" in self.inputs and "token_type_ids" not in feed:  # a tokenizer that leaves them out
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        logits = self.session.run(["logits"], feed)[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return probs[:, 1].tolist()
