"""The prepare stage: source files -> validated, deduplicated, split, tokenised (and packed) Parquet.

    raytune-app prepare --recipe recipes/quickstart.yaml

One streaming Ray Data pipeline, each step a `map_batches` over Arrow batches (consecutive steps
are fused by Ray Data into one task, so a row is read, checked and tokenised without leaving the
worker that read it):

    read (SourceFiles: rows keep file + line)
    -> validate     parse, check the schema, normalise, filter, hash, assign split   (rows.py)
    -> dedupe       first copy of each content hash wins (a small Ray actor remembers the hashes)
    -> tokenise     chat template + tokens + assistant-only mask                     (tokenize.py)
    -> pack         optional, train split of SFT data                                (packing.py)
    -> write        one pass: <stage>/{train,val,test}/*.parquet, rejected.jsonl     (sink.py)

then `manifest.json` (written last: its presence means the output is complete). The output is built
as a new version of the stage folder and only replaces the previous output once complete
(storage.new_version: an atomic swap locally, a pointer flip on object stores), so a failed or killed
run loses nothing already there. A re-run whose inputs and settings are unchanged reuses the output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raytune_app import __version__, console, models, shared_dir, storage
from raytune_app.config import Recipe
from raytune_app.data import rows as rowlib
from raytune_app.data.inputs import Inputs
from raytune_app.data.inputs import resolve as resolve_inputs
from raytune_app.data.mixing import mix_batch, realised
from raytune_app.data.packing import pack
from raytune_app.data.rows import RowProblem, RowSpec
from raytune_app.errors import DataError, MissingInput

if TYPE_CHECKING:
    import ray.data

# Bump when the output layout or the rules change, so old outputs are not reused.
FORMAT_VERSION = 2  # 2: tool calls in messages, a tools column, source layouts and weights

# A chat message as stored: tool calls as JSON text (their arguments differ in shape from call to call).
MESSAGES = pa.list_(
    pa.struct(
        [("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.string()), ("tool_call_id", pa.string())]
    )
)
# The example itself, by data.kind: a chat for SFT, a prompt and two one-message answers for preference
# (TRL's conversational formats, so the trainers take the columns as they are).
EXAMPLE_COLUMNS = {
    "prompt_response": ["messages"],
    "chat": ["messages"],
    "preference": ["prompt", "chosen", "rejected"],
}


def pipeline_schema(kind: str, keep_columns: tuple[str, ...]) -> pa.Schema:
    """Columns of a batch between the validate and tokenise steps (one schema for every batch)."""
    return pa.schema(
        [
            ("source_file", pa.string()),
            ("source_row", pa.int64()),
            ("status", pa.string()),
            ("field", pa.string()),
            ("message", pa.string()),
            ("raw", pa.string()),
            ("content_hash", pa.string()),
            ("split", pa.string()),
        ]
        + [(name, MESSAGES) for name in EXAMPLE_COLUMNS[kind]]
        + ([("tools", pa.string())] if kind != "preference" else [])
        + [(name, pa.string()) for name in keep_columns]
    )


def _stored(message: dict) -> dict:
    calls = message.get("tool_calls")
    return {**message, "tool_calls": json.dumps(calls, ensure_ascii=False)} if calls else message


def _example_columns(example: dict) -> dict:
    if "messages" in example:
        tools = example.get("tools")
        return {
            "messages": [_stored(m) for m in example["messages"]],
            "tools": json.dumps(tools, ensure_ascii=False) if tools else None,
        }
    return {
        "prompt": example["prompt"],
        "chosen": [{"role": "assistant", "content": example["chosen"]}],
        "rejected": [{"role": "assistant", "content": example["rejected"]}],
    }


class RowError(DataError):
    """A bad row under `data.on_error: fail`: names the file, line and field."""


def describe_row(source_file: str, row: int, field: str | None, message: str) -> str:
    where = "row" if source_file.lower().endswith(".parquet") else "line"
    return f"{source_file}, {where} {row}" + (f", field `{field}`" if field else "") + f": {message}"


# ------------------------------------------------------------------------------ pipeline steps


def validate_batch(batch: pa.Table, spec: RowSpec, fail_fast: bool) -> pa.Table:
    schema = pipeline_schema(spec.kind, spec.keep_columns)
    out: dict[str, list] = {name: [] for name in schema.names}
    empty = dict.fromkeys(
        EXAMPLE_COLUMNS[spec.kind] + (["tools"] if spec.kind != "preference" else []) + list(spec.keep_columns)
    )
    for source_file, source_row, raw in zip(*(batch[c].to_pylist() for c in ("_source_file", "_source_row", "_raw"))):
        row = {
            "source_file": source_file,
            "source_row": source_row,
            "status": "ok",
            "field": None,
            "message": None,
            "raw": None,
            "content_hash": None,
            "split": None,
            **empty,
        }
        try:
            record = rowlib.parse_json_line(raw)
            example = rowlib.to_example(record, spec, spec.layout_of(source_file))
            row.update(rowlib.kept_values(record, spec))
            row["content_hash"] = rowlib.content_hash(example)
            row["split"] = rowlib.assign_split(
                rowlib.split_key(example), spec.val_fraction, spec.test_fraction, spec.split_salt
            )
            row.update(_example_columns(example))
        except RowProblem as problem:
            if fail_fast:
                raise RowError(describe_row(source_file, source_row, problem.field, problem.message)) from None
            row.update(empty, status=problem.reason, field=problem.field, message=problem.message, raw=raw)
        for name, value in row.items():
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=schema)


def _set_columns(batch: pa.Table, columns: dict) -> pa.Table:
    for name, values in columns.items():
        index = batch.schema.get_field_index(name)
        batch = batch.set_column(index, batch.schema.field(index), pa.array(values, batch.schema.field(index).type))
    return batch


def _reject_examples(batch: pa.Table, rejected: dict[int, tuple], kind: str) -> pa.Table:
    """Mark rows rejected after validation: {row index: (reason, field, message)}; the example moves to `raw`."""
    if not rejected:
        return batch
    columns = {name: batch[name].to_pylist() for name in ("status", "field", "message", "raw", *EXAMPLE_COLUMNS[kind])}
    for i, (reason, field, message) in rejected.items():
        example = {name: columns[name][i] for name in EXAMPLE_COLUMNS[kind]}
        columns["status"][i], columns["field"][i], columns["message"][i] = reason, field, message
        columns["raw"][i] = json.dumps(example, ensure_ascii=False)
        for name in EXAMPLE_COLUMNS[kind]:
            columns[name][i] = None
    return _set_columns(batch, columns)


class SeenHashes:
    """Remembers which row first claimed each content hash (a Ray actor during prepare).

    Claims are idempotent: a retried task that claims the same rows again is told they are its own,
    so a retry never turns a row into a duplicate of itself.
    """

    def __init__(self):
        self._owner: dict[str, str] = {}

    def claim(self, hashes: list[str], keys: list[str]) -> list[str | None]:
        """For each hash, None when this key owns it, else the key of the row that does."""
        owners = [self._owner.setdefault(h, k) for h, k in zip(hashes, keys)]
        return [None if owner == key else owner for owner, key in zip(owners, keys)]


def dedupe_batch(batch: pa.Table, seen, kind: str) -> pa.Table:
    import ray

    ok = [i for i, s in enumerate(batch["status"].to_pylist()) if s == "ok"]
    if not ok:
        return batch
    hashes = batch["content_hash"].to_pylist()
    files, lines = batch["source_file"].to_pylist(), batch["source_row"].to_pylist()
    keys = [f"{files[i]}\x00{lines[i]}" for i in ok]
    owners = ray.get(seen.claim.remote([hashes[i] for i in ok], keys))
    duplicates = {}
    for i, owner in zip(ok, owners):
        if owner is not None:
            owner_file, owner_line = owner.split("\x00")
            duplicates[i] = (
                "duplicate",
                None,
                f"same content as {describe_row(owner_file, int(owner_line), None, 'kept')}",
            )
    return _reject_examples(batch, duplicates, kind)


@functools.lru_cache(maxsize=2)
def _tokenizer(
    model_path: str,
    tokenizer_path: str | None,
    chat_template: str | None,
    trust_remote_code: bool,
    tokenizer_class: str | None = None,
):
    # Cached per worker process: Ray reuses worker processes across tasks, so each loads it once. Workers get
    # the class the driver's AutoTokenizer chose (models.load_tokenizer: seconds less per new worker).
    return models.load_tokenizer(model_path, tokenizer_path, chat_template, trust_remote_code, tokenizer_class)


def tokenize_batch(batch: pa.Table, model: dict, kind: str, max_length: int, truncation: str) -> pa.Table:
    from raytune_app.data.tokenize import preference_lengths, tokenize_examples

    tokenizer = _tokenizer(
        model["path"], model["tokenizer"], model["chat_template"], model["trust_remote_code"], model["tokenizer_class"]
    )
    ok = [i for i, s in enumerate(batch["status"].to_pylist()) if s == "ok"]
    input_ids: list = [None] * batch.num_rows
    masks: list = [None] * batch.num_rows
    num_tokens: list = [None] * batch.num_rows
    rejected: dict[int, tuple[str, str | None, str]] = {}
    if ok:
        picked = batch.take(ok)
        if kind == "preference":
            answers = [[m[0]["content"] for m in picked[name].to_pylist()] for name in ("chosen", "rejected")]
            for i, length in zip(ok, preference_lengths(tokenizer, picked["prompt"].to_pylist(), *answers)):
                num_tokens[i] = length
                if length > max_length:
                    rejected[i] = ("too_long", None, f"{length} tokens, above data.max_seq_length={max_length}")
        else:
            chats = [rowlib.template_messages(m) for m in picked["messages"].to_pylist()]
            tools = [json.loads(t) if t else None for t in picked["tools"].to_pylist()]
            results = tokenize_examples(tokenizer, chats, max_length, truncation, tools)
            for i, (ids, mask, problem) in zip(ok, results):
                if problem is not None:
                    rejected[i] = (problem.reason, problem.field, problem.message)
                elif ids is not None:
                    input_ids[i], masks[i], num_tokens[i] = ids, mask, len(ids)
    batch = _reject_examples(batch, rejected, kind)
    return (
        batch.append_column("input_ids", pa.array(input_ids, pa.list_(pa.int32())))
        .append_column("completion_mask", pa.array(masks, pa.list_(pa.int8())))
        .append_column("num_tokens", pa.array(num_tokens, pa.int32()))
    )


def pack_batch(batch: pa.Table, capacity: int) -> pa.Table:
    """Pack the train rows of the batch; other rows pass through (val/test stay one example per row)."""
    import pyarrow.compute as pc

    is_train = pc.fill_null(pc.and_(pc.equal(batch["status"], "ok"), pc.equal(batch["split"], "train")), False)
    rest = batch.filter(pc.invert(is_train))
    rest = rest.append_column("seq_lengths", pa.nulls(rest.num_rows, pa.list_(pa.int32()))).append_column(
        "example_hashes", pa.nulls(rest.num_rows, pa.list_(pa.string()))
    )
    train = batch.filter(is_train).select(["input_ids", "completion_mask", "content_hash"]).to_pylist()
    packed = [{"status": "ok", "split": "train", "num_tokens": len(p["input_ids"]), **p} for p in pack(train, capacity)]
    return pa.concat_tables([rest, pa.Table.from_pylist(packed, schema=rest.schema)])


# ---------------------------------------------------------------------------------- the stage


def _fingerprint(recipe: Recipe, files: list) -> str:
    """Hash of everything the output depends on: input files (path, size, mtime), settings, code version."""
    import hashlib

    if recipe.data.generator is not None:
        files = []  # generated input is fully described by the generator settings
    payload = {
        "format": FORMAT_VERSION,
        "version": __version__,
        "files": files,
        "data": recipe.data.model_dump(mode="json"),
        "tokenizer": recipe.model.model_dump(mode="json", include={"path", "tokenizer", "chat_template"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inputs(recipe: Recipe) -> tuple[Inputs, str]:
    """What to read (files, layouts, weights: raytune_app/data/inputs.py) and the fingerprint of the output."""
    if recipe.data.generator is None:
        inputs = resolve_inputs(recipe)
    else:
        generated = _generated_source(recipe)
        inputs = Inputs(paths=[generated], files=storage.file_fingerprint(generated))
    return inputs, _fingerprint(recipe, inputs.files)


def expected_fingerprint(recipe: Recipe) -> str:
    """The fingerprint a prepare output made from this recipe's data and tokenizer settings carries."""
    return _inputs(recipe)[1]


def _generated_source(recipe: Recipe) -> str:
    """The file `data.generator` writes (on first use)."""
    from raytune_app.data import arithmetic, extraction

    generators = {
        "order_extraction": extraction.generate,
        "order_extraction_pairs": extraction.preference_pairs,
        "multi_step_arithmetic": arithmetic.generate,
    }
    gen = recipe.data.generator
    assert gen is not None, "called only for recipes with data.generator"
    path = storage.absolute(storage.join(recipe.run_dir, "source", f"{gen.name}-{gen.rows}-seed{gen.seed}.jsonl"))
    if not storage.exists(path):  # written whole (storage.write_text): a crash never leaves half a file here
        storage.write_text(
            path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generators[gen.name](gen.rows, gen.seed))
        )
    return path


def _token_stats(lengths: np.ndarray) -> dict:
    count = int(lengths.sum())
    if count == 0:
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    cumulative = np.cumsum(lengths)
    percentile = lambda q: int(np.searchsorted(cumulative, q * count))  # noqa: E731
    return {
        "mean": round(float((lengths * np.arange(len(lengths))).sum() / count), 2),
        "p50": percentile(0.5),
        "p95": percentile(0.95),
        "max": int(np.nonzero(lengths)[0].max()),
    }


def _merge_rejects(staging: str) -> int:
    """Concatenate the rejected part files into rejected.jsonl, ordered by file and line."""
    rows: list[dict] = []
    for part in storage.list_files(storage.join(staging, "rejected"), ".jsonl"):
        rows.extend(json.loads(line) for line in storage.read_text(part).splitlines())
    rows.sort(key=lambda r: (r["source_file"], r["line"]))
    storage.write_text(
        storage.join(staging, "rejected.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    storage.remove(storage.join(staging, "rejected"))
    return len(rows)


# Rows per map task: ~4 MiB of source text. Ray's default (blocks of ~1 MiB) makes tasks so short
# that scheduling each one costs a tenth of its run time; measured in benchmarks/prepare_throughput.py.
SOURCE_BYTES_PER_BLOCK = 4 << 20


def mixes(inputs: Inputs) -> bool:
    """Whether the mix step runs: with several sources (to report the realised mix) or any weight but 1."""
    return len(inputs.described) > 1 or bool(inputs.weights)


def _pipeline(recipe: Recipe, inputs: Inputs, seen, tokenizer_class: str | None) -> ray.data.Dataset:
    """The lazy Ray Data pipeline from source files to rows ready for PreparedSink; the tokenize step loads
    `tokenizer_class` (the class the driver's AutoTokenizer chose, models.tokenizer_class_path)."""
    import ray

    from raytune_app.data.sources import SourceFiles

    data = recipe.data
    model = recipe.model.model_dump(include={"path", "tokenizer", "chat_template", "trust_remote_code"})
    model["tokenizer_class"] = tokenizer_class
    # Reading only splits files into lines; the parsing and tokenising happen in the map steps. A read
    # task that reserved a whole CPU would hold it while it waits on backpressure, leaving a core idle
    # (on 2 cores: half the machine) for as long as a big file streams. So reads reserve none, and at
    # most one runs per CPU of the cluster.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(cpus, -(-sum(size for _, size, _ in inputs.files) // SOURCE_BYTES_PER_BLOCK))
    ds = ray.data.read_datasource(
        SourceFiles(inputs.paths, fmt=data.file_format),
        num_cpus=0,
        # The files read (an adapter's source fingerprints the files its one copy was made from).
        concurrency=min(cpus, len(inputs.layouts) or len(inputs.files)),
        override_num_blocks=blocks,
    )
    spec = dataclasses.replace(RowSpec.from_recipe(data), layouts=tuple(sorted(inputs.layouts.items())))
    ds = ds.map_batches(
        validate_batch,
        batch_format="pyarrow",
        batch_size=data.batch_size,
        fn_kwargs={"spec": spec, "fail_fast": data.on_error == "fail"},
    )
    if seen is not None:
        ds = ds.map_batches(
            dedupe_batch,
            batch_format="pyarrow",
            batch_size=data.batch_size,
            fn_kwargs={"seen": seen, "kind": data.kind},
        )
    ds = ds.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        batch_size=data.batch_size,
        fn_kwargs={"model": model, "kind": data.kind, "max_length": data.max_seq_length, "truncation": data.truncation},
    )
    if mixes(inputs):
        ds = ds.map_batches(
            mix_batch,
            batch_format="pyarrow",
            batch_size=data.batch_size,
            fn_kwargs={"weights": inputs.weights, "seed": recipe.run.seed},
        )
    if data.packing:
        ds = ds.map_batches(
            pack_batch, batch_format="pyarrow", batch_size=data.batch_size, fn_kwargs={"capacity": data.max_seq_length}
        )
    return ds


def prepare(recipe: Recipe, force: bool = False) -> dict:
    """Run the prepare stage for a validated recipe; returns the manifest (also in <stage>/manifest.json)."""
    import ray

    from raytune_app import outcomes
    from raytune_app.data.sink import SPLITS, PreparedSink

    data = recipe.data
    out_dir = storage.absolute(recipe.stage_dir("prepare"))
    inputs, fingerprint = _inputs(recipe)
    earlier = storage.read_json(storage.join(storage.current(out_dir), "manifest.json"))
    previous = (
        earlier if not force and isinstance(earlier, dict) and earlier.get("fingerprint") == fingerprint else None
    )
    for index, source in enumerate(inputs.described):
        if source["detected"] and source["layout"] != "columns":
            console.logger("prepare").info(
                f"data.sources[{index}] ({source['source']}): {source['layout']} layout detected "
                "(set data.format, or the source's `format`, to choose)"
            )
    if previous is not None:
        console.logger("prepare").info(f"inputs and settings unchanged: reusing {out_dir}")
        outcomes.note(outcomes.label(recipe, "prepare"), outcomes.REUSED)
        return previous
    why = (
        "--force" if force else ("inputs or settings changed" if earlier is not None else "no complete earlier output")
    )

    # Fail before any Ray work on things that would fail every row: a missing tokenizer or template.
    tokenizer = _tokenizer(
        recipe.model.path, recipe.model.tokenizer, recipe.model.chat_template, recipe.model.trust_remote_code
    )
    # Write tasks on any node put the splits' parts there, and the driver lists them.
    shared_dir.check(recipe.run_dir)
    started = time.time()

    context = ray.data.DataContext.get_current()
    # A RowError must reach the user as itself (file, line, field), not as Ray's generic UDF failure.
    # Datasets copy the context when created, so this is set before the pipeline is built.
    wrapped, context.raise_original_map_exception = context.raise_original_map_exception, True
    seen = ray.remote(num_cpus=0)(SeenHashes).remote() if data.dedupe else None
    # The new output is built beside the old one and swapped in whole (storage.new_version): a failed or
    # killed run leaves the previous output in place.
    with storage.new_version(out_dir, "the prepared data") as staging:
        sink = PreparedSink(staging, data.kind, data.packing, tuple(data.keep_columns), data.max_seq_length)
        try:
            _pipeline(recipe, inputs, seen, models.tokenizer_class_path(tokenizer)).write_datasink(sink)
        except Exception as exc:
            row_error = _find_cause(exc, RowError)
            if row_error is not None:
                raise RowError(str(row_error)) from None
            raise
        finally:
            context.raise_original_map_exception = wrapped
            if seen is not None:
                ray.kill(seen)

        stats: dict = sink.stats or {}
        rejected_rows = _merge_rejects(staging)
        splits = {}
        for split in SPLITS:
            s = stats["splits"][split]
            splits[split] = {
                "rows": s["rows"],
                "examples": s["examples"],
                "tokens": s["tokens"],
                "content_hash": f"{s['hash']:032x}",
                "token_lengths": _token_stats(s["lengths"]),
                "files": [f.rsplit("/", 1)[-1] for f in storage.list_files(storage.join(staging, split), ".parquet")],
            }
        manifest = {
            "stage": "prepare",
            "fingerprint": fingerprint,
            "recipe_hash": recipe.section_hash("data", "model"),
            "kind": data.kind,
            "packed": data.packing,
            "sources": inputs.paths,
            # Per source: files, row layout (and whether it was detected), weight; the realised mix of the train split.
            "inputs": inputs.described,
            "mix": realised(stats["mix"], inputs.weights) if stats["mix"] else None,
            "tokenizer": getattr(tokenizer, "name_or_path", recipe.model.path),
            "model": recipe.model.path,
            "max_seq_length": data.max_seq_length,
            # A weighted source's repeated examples are counted once as inputs.
            "rows_in": stats["rows_in"] - sum(used - available for available, used in stats["mix"].values()),
            "rows_out": {split: splits[split]["examples"] for split in SPLITS},
            "rejected": dict(sorted(stats["rejected"].items())),
            "rejected_rows": rejected_rows,
            "splits": splits,
            # Where the blocks were processed and written: {node id: {blocks, rows}} (data/sink.py).
            "nodes": dict(sorted(stats["nodes"].items())),
            "seconds": round(time.time() - started, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_text(storage.join(staging, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    outcomes.note(outcomes.label(recipe, "prepare"), outcomes.RECOMPUTED, why)
    return manifest


def _find_cause(exc: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of `kind` in the chain (Ray wraps task errors in its own types)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


class NotPrepared(DataError):
    """The prepared data is missing, or was made from other data settings than the recipe's."""


def current_manifest(recipe: Recipe) -> dict:
    """The manifest of the prepared data, checked to be what this recipe's data and model sections make.

    Later stages call this before any work: training or evaluating on stale data is a silent error.
    """
    stage_dir = storage.absolute(recipe.stage_dir("prepare"))
    uri = storage.join(storage.current(stage_dir), "manifest.json")
    try:
        manifest = storage.load_json(uri)
    except FileNotFoundError:
        raise NotPrepared(f"no prepared data at {stage_dir}; run `raytune-app prepare` first") from None
    except storage.Damaged as exc:
        raise NotPrepared(f"{exc}: the prepared data is incomplete; run `raytune-app prepare` again") from None
    if manifest["fingerprint"] != expected_fingerprint(recipe):
        raise NotPrepared(
            f"the prepared data in {stage_dir} was made from other data or settings than this recipe's "
            "data/model sections; run `raytune-app prepare` (or `raytune-app run`) first"
        )
    return manifest


def load_split(stage_dir: str, split: str) -> pa.Table:
    """A prepared split as one Arrow table (for training and evaluation on a single worker)."""
    import pyarrow.parquet as pq

    stage_dir = storage.current(stage_dir)
    files = storage.list_files(storage.join(stage_dir, split), ".parquet")
    if not files:
        raise MissingInput(f"no prepared `{split}` split under {stage_dir}; run `raytune-app prepare` first")
    fs, _ = storage.filesystem(files[0])
    return pa.concat_tables([pq.read_table(storage.filesystem(f)[1], filesystem=fs) for f in files])
