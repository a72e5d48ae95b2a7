"""The evaluate stage: batch generation with Ray Data, task metrics, base vs tuned side by side.

    raytune-app evaluate --recipe recipes/quickstart.yaml
    raytune-app evaluate --recipe recipes/quickstart.yaml --data more.jsonl [--adapter PATH | models:/name@alias]

Which models: the base (`evaluate.include_base`) and the trained weights of the train stage (every
step of a chain), or the one `--adapter` given. Which examples: the prepared `evaluate.split`, or a
JSONL file read with the recipe's column mapping. Each model runs as a Ray Data actor pool of
replicas over length-sorted batches (generation.py); the metrics come from metrics.py.

Layout of `runs/<name>/evaluate/` (with --data: `runs/<name>/evaluate-files/<file>-<hash>/`):
    predictions.parquet   one row per (model, example): prompt, gold, prediction, row-level scores
    metrics.json          per model: task metrics, latency, per-group recall and gap (written last)
    report.md + *.png     the human report: tables, base-vs-tuned bars, loss curve, calibration
A re-run with the same models, data and settings reuses the output.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from raytune_app import __version__, console, integrity, shared_dir, storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError
from raytune_app.evaluate import metrics as M

# The numbers the end-of-run table shows, and the one the registry compares versions by.
HEADLINE = {
    "structured": ["schema_valid_rate", "field_f1", "exact_match"],
    "classification": ["accuracy", "macro_f1", "ece"],
    "free_text": ["normalised_match", "exact_match", "length_ratio"],
}
PRIMARY = {"structured": "field_f1", "classification": "macro_f1", "free_text": "normalised_match"}
FORMAT_VERSION = 3  # bumped when the output changes shape, so a re-run rewrites it


class EvaluateError(DataError):
    """An evaluation that cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class Candidate:
    """A model to evaluate: a name for the report, its weights (None: the base) and what identifies them."""

    name: str
    weights: str | None
    identity: str


# ----------------------------------------------------------------------------------- inputs


def candidates(recipe: Recipe, adapter: str | None = None) -> list[Candidate]:
    """Base model (if asked) plus the trained weights: `adapter`, else every chain step, else the train run."""
    out = [Candidate("base", None, recipe.model.path)] if recipe.evaluate.include_base else []
    if adapter is not None and adapter.startswith("models:/"):
        from raytune_app.registry import store

        # Identified by the version's training fingerprint, so an alias that has not moved is not
        # evaluated again (the download itself lands in a fresh folder every time).
        version = store.version_of(recipe, adapter)
        return out + [
            Candidate(
                adapter.split("/", 1)[1].strip("/"),
                store.download(recipe, adapter),
                version.tags.get("train_fingerprint") or f"{version.name}/{version.version}",
            )
        ]
    if adapter is not None:
        if not storage.exists(adapter):
            raise EvaluateError(f"--adapter {adapter}: no such folder")
        entries = storage.file_fingerprint(adapter)
        return out + [Candidate(Path(adapter.rstrip("/")).name or "adapter", adapter, json.dumps(entries, default=str))]
    chain = _finished(storage.join(storage.absolute(recipe.run_dir), "chain.json")) if recipe.chain else None
    if chain is not None:
        return out + [Candidate(step["step"], step["weights"], step["fingerprint"]) for step in chain["chain"]]
    trained = _finished(storage.join(storage.absolute(recipe.stage_dir("train")), "manifest.json"))
    if trained is not None:
        out.append(Candidate("tuned", trained["weights"], trained["fingerprint"]))
    if not out:
        raise EvaluateError(
            "nothing to evaluate: evaluate.include_base is false and there are no trained weights "
            f"in {recipe.stage_dir('train')}; run `raytune-app train` first or pass --adapter"
        )
    return out


def _finished(uri: str) -> dict | None:
    """A finished training run's record, None when there is none; a damaged one stops the stage by name
    (evaluating only the base model instead would be a silent error)."""
    try:
        return storage.load_json(uri)
    except FileNotFoundError:
        return None
    except storage.Damaged as exc:
        raise EvaluateError(f"{exc}: the training run is not complete; run `raytune-app train` again") from None


def _example_table(prompts: list, golds: list, groups: list, ids: list, files: list, rows: list) -> pa.Table:
    from raytune_app.data.prepare import MESSAGES

    return pa.table(
        {
            "example": pa.array(ids, pa.string()),
            "prompt": pa.array(prompts, MESSAGES),
            "gold": pa.array(golds, pa.string()),
            "group": pa.array(groups, pa.string()),
            "source_file": pa.array(files, pa.string()),
            "source_row": pa.array(rows, pa.int64()),
        }
    )


def prepared_examples(recipe: Recipe, split: str | None = None) -> tuple[pa.Table, str]:
    """A split of the prepared data (default: evaluate.split), and what identifies it."""
    from raytune_app.data.prepare import current_manifest, load_split

    stage_dir = storage.absolute(recipe.stage_dir("prepare"))
    manifest = current_manifest(recipe)
    if manifest["kind"] == "preference":
        raise EvaluateError("the prepared data is preference pairs; evaluation needs prompt_response or chat data")
    split = split or recipe.evaluate.split
    table = load_split(stage_dir, split)
    if table.num_rows == 0:
        raise EvaluateError(
            f"the prepared `{split}` split is empty; set data.split.{split} above 0 or choose another evaluate.split"
        )
    messages = table.column("messages").to_pylist()
    group = recipe.evaluate.group_column
    groups = table.column(group).to_pylist() if group else [None] * table.num_rows
    examples = _example_table(
        [m[:-1] for m in messages],
        [m[-1]["content"] for m in messages],
        groups,
        table.column("content_hash").to_pylist(),
        table.column("source_file").to_pylist(),
        table.column("source_row").to_pylist(),
    )
    return examples, f"prepared:{manifest['fingerprint']}:{split}"


def base_shots(recipe: Recipe) -> list[dict]:
    """The few-shot turns the base model sees before each prompt (evaluate.base_shots): the user and assistant
    messages of the first N rows of the prepared train split (their system prompt is the prompt's own)."""
    from raytune_app.data.prepare import load_split

    wanted = recipe.evaluate.base_shots
    if not wanted:
        return []
    table = load_split(storage.absolute(recipe.stage_dir("prepare")), "train")
    if table.num_rows < wanted:
        raise EvaluateError(
            f"evaluate.base_shots={wanted}: the prepared train split has {table.num_rows} rows; lower base_shots"
        )
    return [
        {"role": m["role"], "content": m["content"]}
        for messages in table.column("messages").to_pylist()[:wanted]
        for m in messages
        if m["role"] != "system"
    ]


def file_examples(recipe: Recipe, path: str) -> tuple[pa.Table, str]:
    """Examples from a JSONL file, read with the recipe's column mapping (data.columns, system prompt).

    Bad rows fail the run naming file and line (data.on_error: fail) or are left out and counted.
    """
    from raytune_app.data import rows as rowlib
    from raytune_app.data import sources
    from raytune_app.data.prepare import RowError, describe_row

    uri = storage.absolute(path)
    if not storage.exists(uri):
        raise EvaluateError(f"--data {path}: no such file")
    if recipe.data.kind == "preference":
        raise EvaluateError(
            "--data: evaluation needs prompt_response or chat rows; the recipe's data.kind is preference"
        )
    group = recipe.evaluate.group_column
    spec = rowlib.RowSpec.from_recipe(recipe.data.model_copy(update={"keep_columns": [group] if group else []}))
    prompts, golds, groups, ids, lines, problems = [], [], [], [], [], []
    for line_number, raw in sources.raw_rows(uri, recipe.data.file_format):
        try:
            record = rowlib.parse_json_line(raw)
            example = rowlib.to_example(record, spec)
            kept = rowlib.kept_values(record, spec)
        except rowlib.RowProblem as problem:
            problems.append(describe_row(uri, line_number, problem.field, problem.message))
            continue
        prompts.append(example["messages"][:-1])
        golds.append(example["messages"][-1]["content"])
        groups.append(kept.get(group) if group else None)
        ids.append(rowlib.content_hash(example))
        lines.append(line_number)
    if problems and recipe.data.on_error == "fail":
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RowError(f"{len(problems)} bad row(s) in {uri} (data.on_error: fail):\n  {shown}")
    if not prompts:
        raise EvaluateError(
            f"--data {path}: no usable rows"
            + (f" ({len(problems)} rejected, first: {problems[0]})" if problems else "")
        )
    if problems:
        console.logger("evaluate").info(f"{len(problems)} row(s) of {uri} left out; first: {problems[0]}")
    identity = json.dumps(storage.file_fingerprint(uri), default=str)
    return _example_table(prompts, golds, groups, ids, [uri] * len(ids), lines), f"file:{identity}"


def load_schema(recipe: Recipe):
    """A jsonschema validator for task structured (the schema file, or the data generator's schema)."""
    import jsonschema

    if recipe.evaluate.schema_file is not None:
        path = recipe.resolve_source(recipe.evaluate.schema_file)
        try:
            schema = json.loads(storage.read_text(storage.absolute(path)))
        except json.JSONDecodeError as exc:
            raise EvaluateError(f"evaluate.schema_file {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    elif recipe.data.generator is not None:
        from raytune_app.data import extraction

        schema = extraction.SCHEMA
    else:
        return None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise EvaluateError(f"evaluate.schema_file: not a valid JSON Schema ({exc.message})") from None
    return cls(schema)


# ------------------------------------------------------------------------------------ running


def _replicas(recipe: Recipe) -> tuple[int, int, bool]:
    """(replicas, CPUs per replica, use GPU) for this cluster. On CPUs a replica's share is also what one node
    can grant (resources.even_share): 2 replicas on a cluster of three 2-CPU nodes take 2 CPUs each, not the
    3 that "6 CPUs / 2" says, which no node has (Ray would wait for ever to place the actor)."""
    import ray

    from raytune_app import resources

    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), max(1, int(total.get("CPU", 1)))
    wanted = recipe.evaluate.replicas
    if gpus:
        replicas = gpus if wanted == "auto" else wanted
        if replicas > gpus:
            raise EvaluateError(f"evaluate.replicas={replicas} needs {replicas} GPUs, the cluster has {gpus}")
        return replicas, 1, True
    replicas = 1 if wanted == "auto" else wanted
    if replicas > cpus:
        raise EvaluateError(f"evaluate.replicas={replicas} needs at least {replicas} CPUs, the cluster has {cpus}")
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    per_node = resources.even_share(nodes, replicas, {}) if nodes else cpus
    if per_node == 0:
        sizes = ", ".join(f"{node.get('CPU', 0):g}" for node in nodes)
        raise EvaluateError(
            f"evaluate.replicas={replicas}: each replica takes at least 1 CPU of one node, and the nodes ({sizes} "
            f"CPUs) cannot hold {replicas}; lower evaluate.replicas"
        )
    return replicas, max(1, min(cpus // replicas, per_node)), False


def _precision(recipe: Recipe, use_gpu: bool) -> str:
    precision = recipe.evaluate.precision
    if precision == "auto":
        precision = recipe.train.precision
    if precision == "fp16" and not use_gpu:
        precision = "bf16"  # fp16 autocast on CPU is slow and lossy; bf16 keeps the range
    return precision


def generate(examples: pa.Table, candidate: Candidate, recipe: Recipe, labels: list[str] | None) -> pa.Table:
    """Predictions of one model for every example, with timings, on the evaluate.backend engine (the evaluate
    stage itself gives vLLM all its models at once: generate_vllm)."""
    if backend(recipe) == "vllm":
        return generate_vllm(examples, [candidate], recipe, labels)[candidate.name]
    return generate_transformers(examples, candidate, recipe, labels)


def generate_transformers(
    examples: pa.Table, candidate: Candidate, recipe: Recipe, labels: list[str] | None, shots: list[dict] | None = None
):
    """Predictions of one model with transformers' generate: a Ray Data actor pool of replicas; `shots`: few-shot
    turns before every prompt."""
    import ray

    from raytune_app.evaluate.generation import Generator

    ev = recipe.evaluate
    replicas, cpus, use_gpu = _replicas(recipe)
    # Longest prompts first, one block per batch: batches hold prompts of similar length (little
    # padding), the biggest batch runs first (an out-of-memory shows at once), and every replica of
    # the pool gets blocks to work on.
    order = sorted(
        range(examples.num_rows), key=lambda i: -sum(len(m["content"]) for m in examples.column("prompt")[i].as_py())
    )
    ordered = examples.take(order)
    blocks = [ordered.slice(i, ev.batch_size) for i in range(0, ordered.num_rows, ev.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        Generator,
        fn_constructor_kwargs={
            "model": recipe.model.model_dump(include={"path", "tokenizer", "chat_template", "trust_remote_code"}),
            "weights": candidate.weights,
            "max_new_tokens": ev.max_new_tokens,
            "temperature": ev.temperature,
            "dtype": _precision(recipe, use_gpu),
            "threads": None if use_gpu else cpus,
            "labels": labels,
            # A distilled student answers its label task when asked with the label prefix; the base is asked plainly.
            "prompt_prefix": recipe.distill.label_prefix
            if "distill" in recipe.run.stages and candidate.weights
            else "",
            "shots": shots,
        },
        compute=ray.data.ActorPoolStrategy(size=replicas),
        batch_size=ev.batch_size,
        batch_format="pyarrow",
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
    )
    # Streamed as the replicas finish batches, for one progress line (the order is restored below).
    log, parts, done = console.logger("evaluate"), [], 0
    for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.append(part)
        done += part.num_rows
        console.progress(log, done, examples.num_rows, f"{candidate.name}: {done}/{examples.num_rows} examples")
    table = pa.concat_tables(parts)
    index = {e: i for i, e in enumerate(examples.column("example").to_pylist())}
    return table.take(sorted(range(table.num_rows), key=lambda i: index[table.column("example")[i].as_py()]))


def backend(recipe: Recipe) -> str:
    """The generation engine evaluate.backend resolves to here: vllm or transformers."""
    from raytune_app import models

    try:
        return models.generation_backend(recipe.evaluate.backend, recipe.model.model_dump())
    except ValueError as exc:
        raise EvaluateError(f"evaluate.backend: {exc}") from None


# evaluate.adapters auto on a CPU merges the adapters when an evaluation's work reaches this many token
# equivalents: the tokens its rows may generate (rows x max_new_tokens) plus a third of its prompt tokens.
# Measured on 2 cores in bf16: an adapter as a vLLM LoRA request decoded 30-45 tokens/s against ~220 merged
# (the quickstart) and prefilled ~100 prompt tokens/s, about three times its decoding rate (e-SNLI, 500
# prompts of ~80 tokens and 4 new tokens each: 7 minutes as LoRA requests); merging costs ~40 s (the merge
# and a second engine's start), so it pays from a few thousand generated tokens or ~3 times as many prompt
# tokens. A small evaluation stays in one engine.
MERGE_FROM_TOKENS = 8_000
PROMPT_TOKEN_SHARE = 3  # a prompt token costs a LoRA request about a third of a generated one
CHARS_PER_TOKEN = 4  # prompts are estimated by their length; the rule needs no tokenizer


def _merge_adapters(ev, examples: pa.Table, use_gpu: bool) -> bool:
    """Whether the vllm backend merges each adapter into a copy of the base (evaluate.adapters)."""
    if ev.adapters == "auto":
        prompt_chars = sum(len(m["content"] or "") for p in examples.column("prompt").to_pylist() for m in p)
        work = examples.num_rows * ev.max_new_tokens + prompt_chars // (CHARS_PER_TOKEN * PROMPT_TOKEN_SHARE)
        return not use_gpu and work >= MERGE_FROM_TOKENS
    return ev.adapters == "merged"


def generate_vllm(
    examples: pa.Table,
    models: list[Candidate],
    recipe: Recipe,
    labels: list[str] | None,
    schema: dict | None = None,
    **overrides,
) -> dict[str, pa.Table]:
    """Predictions of every candidate with vLLM through `ray.data.llm` (vllm_batch.py): one engine for the
    base and its adapters; with `schema`, also "<name>:constrained" tables decoded to that JSON Schema."""
    from raytune_app.evaluate import vllm_batch

    ev = recipe.evaluate
    replicas, cpus, use_gpu = _replicas(recipe)
    prefix = recipe.distill.label_prefix if "distill" in recipe.run.stages else ""
    settings = vllm_batch.Settings(
        max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature,
        precision=_precision(recipe, use_gpu),
        batch_size=ev.batch_size,
        replicas=replicas,
        # Leave half a core for Ray Data's own tasks beside the engine (postprocessing the answers).
        cpus=max(0.5, cpus - 0.5),
        use_gpu=use_gpu,
        labels=labels,
        prompt_prefix=prefix,
        schema=schema,
        constrained=schema is not None,
        kv_cache_gb=ev.kv_cache_gb,
        enforce_eager=ev.enforce_eager,
        seed=recipe.run.seed,
        merge_adapters=_merge_adapters(ev, examples, use_gpu),
        finetuning=recipe.train.finetuning,
        quantization=recipe.train.quantization.model_dump(),
        # Merged copies go where every node reads the run's files (shared_dir); a bucket: this node's temp dir.
        scratch_dir=None if "://" in storage.absolute(recipe.run_dir) else storage.absolute(recipe.run_dir),
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    model = recipe.model.model_dump(include={"path", "tokenizer", "chat_template", "trust_remote_code"})
    return vllm_batch.generate(examples, model, [(c.name, c.weights) for c in models], settings)


def score(task: str, table: pa.Table, validator, labels: list[str] | None) -> tuple[dict, dict, Callable]:
    """(task metrics, row-level columns, recall over a subset of rows) for one model's predictions."""
    predictions = table.column("prediction").to_pylist()
    golds = table.column("gold").to_pylist()
    if task == "structured":
        rows = [M.score_structured(p, g, validator) for p, g in zip(predictions, golds)]

        def recall_of(idx):
            gold = sum(rows[i]["fields_gold"] for i in idx)
            return round(sum(rows[i]["fields_matched"] for i in idx) / gold, 6) if gold else None

        return M.structured(rows, validator is not None), _columns(rows), recall_of
    if task == "classification":
        labels = labels or []  # the evaluate stage always passes the task's labels for classification
        predicted = [M.match_label(p, labels) for p in predictions]
        probs = table.column("label_probs").to_pylist() if "label_probs" in table.column_names else None
        result = M.classification(predicted, golds, labels, probs)
        columns = {"predicted_label": predicted, "correct": [p == g for p, g in zip(predicted, golds)]}
        return result, columns, lambda idx: M.per_class_recall([predicted[i] for i in idx], [golds[i] for i in idx])
    rows = [M.score_free_text(p, g) for p, g in zip(predictions, golds)]
    recall = lambda idx: round(sum(rows[i]["normalised_match"] for i in idx) / len(idx), 6) if idx else None  # noqa: E731
    return M.free_text(rows), _columns(rows), recall


def _columns(rows: list[dict]) -> dict:
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


def _fingerprint(recipe: Recipe, data_identity: str, models: list[Candidate], labels, shots: list[dict]) -> str:
    payload = {
        "shots": shots,  # the examples themselves: with --data, the prepared split they come from may change
        "format": FORMAT_VERSION,
        "version": __version__,
        "data": data_identity,
        "labels": labels,
        "evaluate": recipe.evaluate.model_dump(
            mode="json", exclude={"replicas", "batch_size", "kv_cache_gb", "enforce_eager", "backend"}
        ),
        "backend": backend(recipe),
        "model": recipe.model.model_dump(mode="json"),
        "candidates": [(c.name, c.identity) for c in models],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate(recipe: Recipe, data_file: str | None = None, adapter: str | None = None, force: bool = False) -> dict:
    """Run the evaluate stage; returns metrics.json's content."""
    from raytune_app import outcomes
    from raytune_app.evaluate.report import write_report

    ev = recipe.evaluate
    say = console.logger("evaluate").info
    # Everything that can be wrong with the inputs is checked before a model is loaded.
    models = candidates(recipe, adapter)
    for candidate in models:  # weights cut short (a crash, a full disk) are named here, not inside a replica
        if candidate.weights:
            integrity.check_weights(candidate.weights, f"{candidate.name} weights")
    examples, data_identity = file_examples(recipe, data_file) if data_file else prepared_examples(recipe)
    if ev.limit is not None:
        examples = examples.slice(0, ev.limit)
    validator = load_schema(recipe) if ev.task == "structured" else None
    labels = None
    if ev.task == "classification":
        labels = ev.labels or sorted(set(examples.column("gold").to_pylist()))
        if len(labels) < 2:
            raise EvaluateError(f"classification needs at least two labels; found {labels} (set evaluate.labels)")
    if ev.task == "structured":
        bad = next((g for g in examples.column("gold").to_pylist() if not M.parse_json(g)[0]), None)
        if bad is not None:
            raise EvaluateError(
                f"task structured: a gold answer is not JSON ({bad[:80]!r}); "
                "use evaluate.task free_text for text answers"
            )

    out_dir = storage.absolute(recipe.stage_dir("evaluate"))
    if data_file:  # beside the stage's own output, one folder per scored file
        out_dir = storage.join(
            storage.absolute(recipe.run_dir),
            "evaluate-files",
            f"{Path(data_file).stem}-{hashlib.sha256(data_identity.encode()).hexdigest()[:8]}",
        )
    # Read before any model work: a base_shots larger than the train split stops here.
    shots = base_shots(recipe) if any(c.weights is None for c in models) else []
    fingerprint = _fingerprint(recipe, data_identity, models, labels, shots)
    earlier = storage.read_json(storage.join(storage.current(out_dir), "metrics.json"))
    if not force and isinstance(earlier, dict) and earlier.get("fingerprint") == fingerprint:
        say(f"models, data and settings unchanged: reusing {out_dir}")
        if not data_file:
            outcomes.note(outcomes.label(recipe, "evaluate"), outcomes.REUSED)
        return {**earlier, "output_dir": storage.current(out_dir)}
    why = "--force" if force else ("models, data or settings changed" if earlier else "no complete earlier output")

    shared_dir.check(recipe.run_dir)  # replicas on any node load the weights from there
    engine = backend(recipe)
    if ev.schema_constrained and (validator is None or engine != "vllm"):
        raise EvaluateError(
            "evaluate.schema_constrained needs a JSON Schema (evaluate.schema_file or data.generator)"
            if validator is None
            else "evaluate.schema_constrained needs the vllm backend; vLLM is not installed here (scripts/setup.sh)"
        )
    say(
        f"{examples.num_rows} examples ({data_file or 'split ' + ev.split}) on {engine}; models: "
        + ", ".join(f"{c.name} ({c.weights or recipe.model.path})" for c in models)
    )
    generated, began_all = None, time.time()
    if engine == "vllm":  # every candidate in one engine run (the base and its LoRA adapters share it)
        schema = validator.schema if ev.schema_constrained and validator is not None else None
        generated = generate_vllm(examples, models, recipe, labels, schema, base_shots=shots)
        say(f"vLLM generated for {len(models)} model(s) in {time.time() - began_all:.0f} s")
    results, tables, placed = {}, [], {}
    for candidate in models:
        began = time.time()
        table = (
            generated[candidate.name]
            if generated
            else generate_transformers(examples, candidate, recipe, labels, None if candidate.weights else shots)
        )
        task_metrics, row_columns, recall_of = score(ev.task, table, validator, labels)
        wall = max(table.column("batch_end").to_pylist()) - min(table.column("batch_start").to_pylist())
        result = {
            "weights": candidate.weights,
            "identity": candidate.identity,
            **task_metrics,
            "latency": M.latency(table.column("latency_s").to_pylist(), table.column("new_tokens").to_pylist(), wall),
            "seconds": round(wall if generated else time.time() - began, 1),
        }
        if candidate.weights is None and shots:
            result["few_shot"] = ev.base_shots  # the base saw this many training examples before each prompt
        if "node" in table.column_names:  # where the replicas ran: {node id: examples} (transformers engine)
            placed[candidate.name] = dict(sorted(Counter(table.column("node").to_pylist()).items()))
        if generated and f"{candidate.name}:constrained" in generated:
            constrained = generated[f"{candidate.name}:constrained"]
            result["constrained"] = score(ev.task, constrained, validator, labels)[0]
            table = table.append_column("constrained_prediction", constrained.column("prediction"))
        if ev.group_column:
            result["groups"] = {"column": ev.group_column, **M.group_gap(table.column("group").to_pylist(), recall_of)}
        results[candidate.name] = result
        for name, values in row_columns.items():
            table = table.append_column(name, pa.array(values))
        tables.append(table.append_column("model", pa.array([candidate.name] * table.num_rows, pa.string())))
        shown = ", ".join(f"{k} {_fmt(result.get(k))}" for k in HEADLINE[ev.task])
        if "constrained" in result:
            shown += ", constrained: " + ", ".join(
                f"{k} {_fmt(result['constrained'].get(k))}" for k in HEADLINE[ev.task]
            )
        shot = f" ({ev.base_shots}-shot)" if "few_shot" in result else ""
        say(
            f"{candidate.name}{shot}: {shown}, p50 latency {_fmt(result['latency']['p50_s'])} s "
            f"({result['seconds']} s incl. model load)"
        )

    summary = {
        "stage": "evaluate",
        "fingerprint": fingerprint,
        "task": ev.task,
        "primary_metric": PRIMARY[ev.task],
        "data": data_file or f"split {ev.split}",
        "examples": examples.num_rows,
        "labels": labels,
        "base_model": recipe.model.path,
        "backend": engine,
        "models": results,
        # Per model, the nodes its replicas ran on: {node id: examples}. Beside `models`, not in it: where the
        # work ran is no result (comparisons of two runs' model results stay equal across clusters).
        "nodes": placed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Built as a new version and swapped in whole (metrics.json last): a killed run leaves the previous
    # evaluation in place.
    with storage.new_version(out_dir, "the evaluation") as staging:
        _write_predictions(
            pa.concat_tables(tables, promote_options="permissive"), storage.join(staging, "predictions.parquet")
        )
        write_report(
            summary,
            recipe,
            staging,
            loss_curve=storage.join(storage.absolute(recipe.stage_dir("train")), "loss_curve.png"),
        )
        storage.write_text(storage.join(staging, "metrics.json"), json.dumps(summary, indent=2) + "\n")
    if not data_file:
        outcomes.note(outcomes.label(recipe, "evaluate"), outcomes.RECOMPUTED, why)
    summary["output_dir"] = storage.current(out_dir)
    return summary


def _write_predictions(table: pa.Table, uri: str) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    keep = [c for c in table.column_names if c not in ("batch_start", "batch_end", "node")]
    pq.write_table(table.select(keep), path, filesystem=fs)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def comparison_table(summary: dict) -> str:
    """The short base-vs-tuned table printed at the end of a run (one column per model)."""
    task = summary["task"]
    rows = [
        (key.replace("_", " "), [summary["models"][m].get(key) for m in summary["models"]])
        for key in HEADLINE[task][:2]
    ]
    if any("constrained" in summary["models"][m] for m in summary["models"]):
        rows += [
            (
                f"{key.replace('_', ' ')} (constrained)",
                [summary["models"][m].get("constrained", {}).get(key) for m in summary["models"]],
            )
            for key in HEADLINE[task][:2]
        ]
    rows.append(("p50 latency (s)", [summary["models"][m]["latency"]["p50_s"] for m in summary["models"]]))
    names = list(summary["models"])
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(n.rjust(12) for n in names)]
    lines += [label.ljust(width) + "".join(_fmt(v).rjust(12) for v in values) for label, values in rows]
    return "\n".join(lines)
