"""Batch generation with vLLM through Ray Data's LLM processor (`ray.data.llm`): the evaluate stage,
`raytune-app pairs` and the distill `hf` / `vllm` teachers generate here when vLLM is installed.

    tables = generate(examples, model, [("base", None), ("tuned", "runs/x/train/adapter")], settings)

One engine serves every model of a call that shares the base: the base answers its rows, and each LoRA adapter
under test answers its own (vLLM LoRA requests, the row's `model`); a full fine-tune gets an engine of its
own. With `merge_adapters` (evaluate.adapters; on a CPU for larger runs) each adapter is merged into a copy of
the base first (raytune_app/export/merge.py: the same merge as `raytune-app export`; a QLoRA adapter into the
de-quantised 4-bit base it trained against) and answers from an engine of its own like a full fine-tune:
vLLM's CPU LoRA kernels decoded the quickstart's adapter five to seven times slower than its merged copy
(BENCHMARKS.md, "quickstart end to end"), which costs more than a second engine's start. On a GPU the adapters
stay LoRA requests in the base's engine (one engine, little overhead there).

Prompts are rendered and tokenised here with the model's own tokenizer and chat template
(raytune_app/models.py, the same helper the transformers path and serving use), and every row stops on the
same stop tokens, so a greedy reply is the one the transformers path writes up to float rounding
(tests/test_vllm_batch.py compares them). Rows can ask for schema-constrained decoding (vLLM structured
outputs with the task's JSON Schema) beside free decoding, in the same engine run.

Columns out, per candidate, as the transformers generator's (generation.py): `prediction`,
`new_tokens`, `latency_s` (the engine's time from taking the request to its last token), `batch_start`,
`batch_end` (wall clock of that request, for tokens/s over the run) and `label_probs` for classification
(each label's summed token log-probability as a continuation of the prompt, from vLLM's prompt logprobs,
normalised over the labels -- what generation.py computes with a forward pass).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa

# vLLM's accepted max_lora_rank values (vllm.config.LoRAConfig); an engine takes the smallest that fits.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class Settings:
    """How to generate: the evaluate section's numbers, plus what the cluster gives the engine."""

    max_new_tokens: int
    temperature: float = 0.0
    precision: str = "fp32"
    batch_size: int = 16
    replicas: int = 1
    cpus: float = 1.0  # CPUs the engine's bundle reserves on a CPU-only cluster
    use_gpu: bool = False
    labels: list[str] | None = None
    prompt_prefix: str = ""  # before the last user message of a trained model's prompts (a DSS student)
    base_shots: list[dict] = field(default_factory=list)  # few-shot turns before the base model's prompts
    schema: dict | None = None  # with `constrained`: rows are decoded both freely and constrained to it
    constrained: bool = False
    kv_cache_gb: int = 1
    enforce_eager: bool = False
    seed: int = 0
    merge_adapters: bool = False  # each LoRA adapter merged into a copy of the base, in an engine of its own
    finetuning: str = "lora"  # how the adapters were trained (qlora: merged into the de-quantised 4-bit base)
    quantization: dict | None = None  # train.quantization of a QLoRA adapter (None: the defaults)
    scratch_dir: str | None = None  # where merged copies are written (a folder every node sees); None: a temp dir
    extra: dict = field(default_factory=dict)  # more vLLM engine arguments


def _adapter_folder(weights: str | None) -> str | None:
    from raytune_app import storage

    if weights is None:
        return None
    local = storage.local_dir(weights)
    return local if os.path.exists(os.path.join(local, "adapter_config.json")) else None


def _engines(model: dict, candidates: list[tuple[str, str | None]]) -> list[tuple[str, list]]:
    """(model source, [(candidate name, LoRA folder or None, trained)]) per engine to start: the base with
    all adapters, and one per full fine-tune."""
    from raytune_app import models, storage

    base = models.resolve(model["path"])
    engines: dict = {}
    for name, weights in candidates:
        adapter = _adapter_folder(weights)
        source = base if weights is None or adapter else storage.local_dir(weights)
        engines.setdefault(source, []).append((name, adapter, weights is not None))
    return list(engines.items())


def _max_rank(folders: list[str]) -> int:
    from raytune_app.serve.vllm_stream import adapter_rank

    rank = max(adapter_rank(f) for f in folders)
    return next((r for r in LORA_RANKS if r >= rank), rank)


def _config(source: str, adapters: list[str], longest: int, s: Settings, model: dict):
    from ray.data.llm import vLLMEngineProcessorConfig

    from raytune_app import models

    engine = {
        "dtype": models.vllm_dtype(s.precision, s.use_gpu),
        # Room for the longest prompt and its answer, rounded up; the KV cache then holds more rows at once.
        "max_model_len": -(-(longest + s.max_new_tokens + 8) // 256) * 256,
        "max_num_seqs": max(s.batch_size, 32),
        "max_logprobs": 20,
        "enforce_eager": s.enforce_eager,
        "trust_remote_code": model.get("trust_remote_code", False),
    }
    if model.get("tokenizer"):
        engine["tokenizer"] = models.resolve(model["tokenizer"])
    if adapters:
        from raytune_app.serve.vllm_stream import lora_slots, lora_target_modules

        # On a CPU one spare LoRA slot: the base candidate's rows share batches with the adapters' (lora_slots).
        slots = lora_slots(len(adapters), s.use_gpu)
        engine |= {
            "enable_lora": True,
            "max_lora_rank": _max_rank(adapters),
            "max_loras": slots,
            "max_cpu_loras": slots,
        }
        # LoRA on the decoder's linear layers only: label scoring asks for prompt logprobs, which vLLM 0.32's
        # LoRA logits path cannot compute in a shared batch (vllm_stream.lora_target_modules).
        engine["lora_target_modules"] = list(lora_target_modules(source, model.get("trust_remote_code", False)))
    engine |= s.extra
    return vLLMEngineProcessorConfig(
        model_source=source,
        engine_kwargs=engine,
        batch_size=s.batch_size,
        concurrency=s.replicas,
        # The prompts come tokenised (the same tokenizer and template as the transformers path): no
        # template, tokenizer or detokenizer stages of the processor's own.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        # One bundle per replica: a GPU, or on a CPU-only cluster a share of the cores.
        placement_group_config=None if s.use_gpu else {"bundles": [{"CPU": s.cpus}]},
        runtime_env=None if s.use_gpu else {"env_vars": models.vllm_cpu_single_process_env(s.cpus, s.kv_cache_gb)},
        log_engine_metrics=False,
    )


def _rows(examples: pa.Table, tokenizer, s: Settings, stop_ids: list[int], engine_model: str, members):
    """The processor's input rows: per candidate, each example free (and constrained), plus label scoring.
    Every row carries every sampling key, so they share one Arrow type (None: vLLM's default)."""
    from raytune_app import models
    from raytune_app.distill.run import prefix_last_user
    from raytune_app.evaluate.generation import with_shots

    prompts = examples.column("prompt").to_pylist()
    # The base is asked after its few-shot turns, if any; a trained model as it was trained: with the prefix of
    # a distilled student's task, if any. Without either, both read the same prompts (tokenised once).
    base_ids = [models.chat_prompt_ids(tokenizer, with_shots(p, s.base_shots)) for p in prompts]
    trained_ids = (
        [models.chat_prompt_ids(tokenizer, prefix_last_user(p, s.prompt_prefix)) for p in prompts]
        if s.prompt_prefix or s.base_shots
        else base_ids
    )
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in s.labels or []]
    free = {
        "max_tokens": s.max_new_tokens,
        "temperature": float(s.temperature),
        "stop_token_ids": stop_ids,
        "skip_special_tokens": True,
        "seed": None,
        "prompt_logprobs": None,
        "structured_outputs": None,
    }
    rows = []
    for name, adapter, trained in members:
        prompt_ids = trained_ids if trained else base_ids
        for i, example in enumerate(examples.column("example").to_pylist()):
            row = {
                "candidate": name,
                "example": example,
                "index": i,
                "model": adapter or engine_model,
                "tokenized_prompt": prompt_ids[i],
                "prompt_length": len(prompt_ids[i]),
                "label": -1,
            }
            sampling = free | ({"seed": s.seed + i} if s.temperature > 0 else {})
            rows.append(row | {"kind": "free", "sampling_params": sampling})
            if s.constrained and s.schema is not None:
                schema = {"structured_outputs": {"json": json.dumps(s.schema)}}
                rows.append(row | {"kind": "constrained", "sampling_params": sampling | schema})
            for j, label in enumerate(label_ids):
                score = free | {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
                rows.append(
                    row
                    | {"kind": "label", "label": j, "tokenized_prompt": prompt_ids[i] + label, "sampling_params": score}
                )
    return rows


def _finish(row: dict) -> dict:
    """One engine answer as the columns the stage reads."""
    end = time.time()
    taken = float(row.get("time_taken_llm") or 0.0)
    label_logprob = None
    if row["kind"] == "label":
        # The label's tokens close the prompt; each one's logprob sits at its own position.
        tokens = list(row["prompt_token_ids"])[row["prompt_length"] :]
        positions = list(row.get("prompt_logprobs") or [])[row["prompt_length"] :]
        label_logprob = 0.0
        for token, pos in zip(tokens, positions):
            entry = (pos or {}).get(int(token)) or (pos or {}).get(str(token)) or {}
            label_logprob += float(entry.get("logprob", -1e9))
    return {
        "candidate": row["candidate"],
        "example": row["example"],
        "index": int(row["index"]),
        "kind": row["kind"],
        "label": int(row["label"]),
        "text": (row.get("generated_text") or "").strip(),
        "new_tokens": int(row.get("num_generated_tokens") or 0),
        "latency_s": taken,
        "start": end - taken,
        "end": end,
        "label_logprob": label_logprob,
        "error": row.get("__inference_error__") or None,
    }


def generate(examples: pa.Table, model: dict, candidates: list[tuple[str, str | None]], s: Settings) -> dict:
    """{candidate name: examples + generated columns} (and "<name>:constrained" tables when asked)."""
    from raytune_app import models

    tokenizer = models.load_tokenizer(
        model["path"], model.get("tokenizer"), model.get("chat_template"), model.get("trust_remote_code", False)
    )
    stop_ids = models.stop_token_ids(tokenizer)
    with _merged(model, candidates, s) as engine_candidates:
        answers = _answers(examples, model, engine_candidates, s, tokenizer, stop_ids)
    errors = [a for a in answers if a["error"]]
    if errors:
        raise RuntimeError(f"vLLM failed on {len(errors)} row(s); first: {errors[0]['error']}")
    return _tables(examples, candidates, answers, s)


@contextmanager
def _merged(model: dict, candidates: list[tuple[str, str | None]], s: Settings):
    """The candidates with each LoRA adapter replaced by a merged copy of base + adapter (`s.merge_adapters`),
    written in the engine's dtype under `s.scratch_dir` and removed afterwards; else the candidates as given.

    Each merge runs as a Ray task on this node: its libraries' progress bars and notices go to the run's log
    file with the other workers' output, and the float32 base it loads is freed with the task's process."""
    if not s.merge_adapters or not any(_adapter_folder(w) for _, w in candidates):
        yield candidates
        return
    import shutil
    import tempfile

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytune_app import console, models

    dtype = models.compute_precision(s.precision, s.use_gpu)  # the engine's dtype (models.vllm_dtype)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=1)(merge_adapter).options(scheduling_strategy=here)
    if s.scratch_dir:
        os.makedirs(s.scratch_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix=".merged-adapters-", dir=s.scratch_dir)
    try:
        merged = []
        for i, (name, weights) in enumerate(candidates):
            adapter = _adapter_folder(weights)
            if adapter is None:
                merged.append((name, weights))
                continue
            began, folder = time.time(), os.path.join(root, str(i))
            ray.get(task.remote(model, adapter, folder, s.finetuning, dtype, s.quantization))
            took = time.time() - began
            console.logger("evaluate").info(f"{name}: adapter merged into a copy of the base in {took:.0f} s")
            merged.append((name, folder))
        yield merged
    finally:
        shutil.rmtree(root, ignore_errors=True)


def merge_adapter(
    model: dict, adapter: str, folder: str, finetuning: str, dtype: str, quantization: dict | None = None
) -> None:
    """Base + `adapter` merged (raytune_app/export/merge.py) and saved with its tokenizer to `folder`."""
    from raytune_app.config import ModelSection
    from raytune_app.export.merge import merged_model
    from raytune_app.train.settings import QuantSection

    _, net, tokenizer = merged_model(
        ModelSection.model_validate(model),
        adapter,
        finetuning=finetuning,
        dtype=dtype,
        quantization=QuantSection.model_validate(quantization or {}),
    )
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _answers(examples: pa.Table, model: dict, candidates, s: Settings, tokenizer, stop_ids: list[int]) -> list[dict]:
    """Every engine's answers to its rows: one processor run per engine, one after the other."""
    import math

    import ray
    from ray.data.llm import build_processor

    from raytune_app import console

    log, answers = console.logger("evaluate"), []
    for source, members in _engines(model, candidates):
        rows = _rows(examples, tokenizer, s, stop_ids, source, members)
        longest = max(len(r["tokenized_prompt"]) for r in rows)
        adapters = sorted({a for _, a, _ in members if a})
        processor = build_processor(
            _config(source, adapters, longest, s, model),
            postprocess=_finish,
            # Ray Data's own map tasks around the engine take a sliver of a core: at the default of one CPU
            # each they would wait forever beside an engine holding the rest of a small machine.
            preprocess_map_kwargs={"num_cpus": 0.25},
            postprocess_map_kwargs={"num_cpus": 0.25},
        )
        blocks = max(1, math.ceil(len(rows) / s.batch_size))
        # Streamed as the engine finishes batches, for one progress line per engine (a long, quiet wait else).
        names, done = ", ".join(dict.fromkeys(name for name, _, _ in members)), 0
        for row in processor(ray.data.from_items(rows, override_num_blocks=blocks)).iter_rows():
            answers.append(row)
            done += 1
            console.progress(log, done, len(rows), f"{names}: {done}/{len(rows)} generations")
    return answers


def _tables(examples: pa.Table, candidates, answers: list[dict], s: Settings) -> dict:
    import math

    by: dict = {}
    for a in answers:
        by.setdefault((a["candidate"], a["kind"]), {})[(a["index"], a["label"])] = a
    out = {}
    for name, _ in candidates:
        for kind in ("free", "constrained"):
            got = by.get((name, kind))
            if got is None:
                continue
            rows = [got[(i, -1)] for i in range(examples.num_rows)]
            columns = {
                "prediction": pa.array([r["text"] for r in rows], pa.string()),
                "new_tokens": pa.array([r["new_tokens"] for r in rows], pa.int64()),
                "latency_s": pa.array([r["latency_s"] for r in rows], pa.float64()),
                "batch_start": pa.array([r["start"] for r in rows], pa.float64()),
                "batch_end": pa.array([r["end"] for r in rows], pa.float64()),
            }
            if s.labels and kind == "free":
                scores = by[(name, "label")]
                probs = []
                for i in range(examples.num_rows):
                    logs = [scores[(i, j)]["label_logprob"] for j in range(len(s.labels))]
                    top = max(logs)
                    weights = [math.exp(v - top) for v in logs]
                    probs.append([w / sum(weights) for w in weights])
                columns["label_probs"] = pa.array(probs, pa.list_(pa.float64()))
            table = examples
            for column, values in columns.items():
                table = table.append_column(column, values)
            out[name if kind == "free" else f"{name}:constrained"] = table
    return out
