"""The distill stage (Distilling Step-by-Step): teacher rationales for the prepared training inputs, kept
when their label checks out, turned into two tasks per input for the student.

    raytune-app distill --recipe recipes/dss.yaml

1. Inputs: the prepared train split (prepare stage): the user message is the input, the assistant
   message the gold label.
2. Teacher: every (input, sample) not in the cache goes through Ray Data to the teacher backend
   (raytune_app/distill/teachers.py; the `columns` backend reads rationales already in the data,
   raytune_app/distill/columns.py, and its rows lacking one are dropped or kept label-only). Outputs
   are saved to the cache (in the run directory, local or a bucket) batch by batch as they arrive,
   keyed by (input, teacher, prompt, sampling, sample index), so a re-run or a crash never pays twice.
3. Filter (raytune_app/distill/parse.py): parse rationale and label; keep a rationale whose label
   matches the gold label (`gold`) or the samples' majority (`self_consistency`); count every
   rejection by reason (manifest.json, rejected.jsonl).
4. Student data: `[label] input -> label` for every input (gold labels; so lambda = 0 is plain
   fine-tuning on the same inputs) and `[rationale] input -> rationale` for each kept rationale; the
   validation split is the prepared one in the label task's form. Tokenised like prepare's output
   (plus a `task` column), in <run dir>/distill/{train,val}/, which the train stage then reads; it
   weighs the rationale task by train.distill.rationale_weight.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter

import pyarrow as pa

from raytune_app import __version__, console, storage
from raytune_app.config import Recipe
from raytune_app.distill import columns, parse
from raytune_app.distill.parse import prefix_last_user
from raytune_app.errors import DataError

FORMAT_VERSION = 1


class DistillError(DataError):
    """A distill run that cannot go on; the message says why and what to do."""


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def teacher_identity(recipe: Recipe) -> dict:
    """What makes two teacher outputs interchangeable: backend, model / program / endpoint, prompt, sampling."""
    t, p = recipe.distill.teacher, recipe.distill.prompt
    who = {
        "program": t.program,
        "hf": t.model,
        "vllm": t.model,
        "openai": f"{t.base_url}|{t.model}",
        "columns": f"{t.rationale_column}|{t.label_column or 'gold'}",
    }[t.backend]
    return {
        "backend": t.backend,
        "who": who,
        "prompt": _hash(p.model_dump()) if t.backend not in ("program", "columns") else None,
        "temperature": t.temperature,
        "max_new_tokens": t.max_new_tokens,
    }


def distilled(recipe: Recipe) -> bool:
    return "distill" in recipe.run.stages


def _teacher_prompt(recipe: Recipe, text: str) -> list[dict]:
    p = recipe.distill.prompt
    messages = [{"role": "system", "content": p.instruction}]
    for shot in p.few_shot:
        messages += [{"role": "user", "content": shot.input}, {"role": "assistant", "content": shot.output}]
    return messages + [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ cache


class TeacherCache:
    """Teacher outputs in the run directory (local or remote): JSON lines {key, text} in <cache>/*.jsonl.

    Each batch of answers becomes its own small file, written whole (storage.write_text), as soon as it
    arrives: a kill loses at most the batch in flight, and object stores (which cannot append) keep the
    cache too. `compact()` merges the part files into one at the end of a run. Failures are not cached:
    a later run asks again."""

    def __init__(self, folder: str):
        self.folder = storage.absolute(folder)
        self.entries: dict[str, str] = {}
        self.parts: list[str] = storage.list_files(self.folder, ".jsonl")
        for part in self.parts:
            for line in storage.read_text(part).splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash (caches written before parts were atomic)
                self.entries[entry["key"]] = entry["text"]
        self._session = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._batches = 0

    def add(self, answers: list[tuple[str, str]]) -> None:
        """Persist a batch of (key, text) answers as one new part file."""
        if not answers:
            return
        self._batches += 1
        part = storage.join(self.folder, f"part-{self._session}-{self._batches:05d}.jsonl")
        storage.write_text(
            part, "".join(json.dumps({"key": k, "text": t}, ensure_ascii=False) + "\n" for k, t in answers)
        )
        self.parts.append(part)
        self.entries.update(answers)

    def compact(self) -> None:
        """Merge the part files into one (written first; the parts are deleted after, so a crash in
        between leaves duplicates, which are harmless)."""
        if len(self.parts) < 2:
            return
        merged = storage.join(self.folder, f"cache-{self._session}-{uuid.uuid4().hex[:6]}.jsonl")
        storage.write_text(
            merged,
            "".join(json.dumps({"key": k, "text": t}, ensure_ascii=False) + "\n" for k, t in self.entries.items()),
        )
        for part in self.parts:
            storage.remove(part)
        self.parts = [merged]


def _ask_teacher(recipe: Recipe, requests: list[dict], cache: TeacherCache) -> dict:
    """Teacher outputs for the requests not in the cache; returns {key: (text, error)} and fills the cache."""
    import ray

    from raytune_app.distill.teachers import teach

    answers, started = {}, time.time()
    ds = ray.data.from_items(requests)
    for batch in teach(ds, recipe.distill).iter_batches(batch_format="pyarrow", batch_size=None):
        rows = batch.select(["key", "teacher_text", "teacher_error"]).to_pylist()
        for row in rows:
            answers[row["key"]] = (row["teacher_text"], row["teacher_error"])
        cache.add([(row["key"], row["teacher_text"]) for row in rows if row["teacher_text"] is not None])
        rate = len(answers) / max(time.time() - started, 1e-9)
        console.logger("distill").info(f"teacher {len(answers)}/{len(requests)} ({rate:.1f}/s)")
    return answers


# ------------------------------------------------------------------------------------------ stage


def _inputs(table: pa.Table) -> list[dict]:
    rows = []
    for messages, content_hash in zip(table.column("messages").to_pylist(), table.column("content_hash").to_pylist()):
        user = [m for m in messages if m["role"] == "user"]
        gold = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        rows.append({"messages": messages, "input": user[-1]["content"], "gold": gold, "content_hash": content_hash})
    return rows


def _fingerprint(recipe: Recipe, prepared: dict) -> str:
    return _hash(
        {
            "format": FORMAT_VERSION,
            "prepared": prepared["fingerprint"],
            "distill": recipe.distill.model_dump(mode="json"),
            "model": recipe.model.model_dump(mode="json"),
            "max_seq_length": recipe.data.max_seq_length,
            "truncation": recipe.data.truncation,
        }
    )[:32]


def _tokenised(
    tokenizer, chats: list[list[dict]], tasks: list[str], hashes: list[str], max_length: int, truncation: str
):
    from raytune_app.data.tokenize import tokenize_examples

    kept: dict[str, list] = {"input_ids": [], "completion_mask": [], "num_tokens": [], "task": [], "content_hash": []}
    dropped: Counter[str] = Counter()
    for (ids, mask, problem), task, content_hash in zip(
        tokenize_examples(tokenizer, chats, max_length, truncation), tasks, hashes
    ):
        if problem is not None or ids is None:
            dropped[f"{task}:{problem.reason if problem else 'no_tokens'}"] += 1
            continue
        for name, value in (
            ("input_ids", ids),
            ("completion_mask", mask),
            ("num_tokens", len(ids)),
            ("task", task),
            ("content_hash", content_hash),
        ):
            kept[name].append(value)
    table = pa.table(
        {
            "input_ids": pa.array(kept["input_ids"], pa.list_(pa.int32())),
            "completion_mask": pa.array(kept["completion_mask"], pa.list_(pa.int8())),
            "num_tokens": pa.array(kept["num_tokens"], pa.int64()),
            "task": pa.array(kept["task"], pa.string()),
            "content_hash": pa.array(kept["content_hash"], pa.string()),
        }
    )
    return table, dropped


def current_manifest(recipe: Recipe) -> dict:
    """The distill output's manifest, checked to match the recipe and the prepared data."""
    from raytune_app.data.prepare import NotPrepared
    from raytune_app.data.prepare import current_manifest as prepared_manifest

    stage_dir = storage.absolute(recipe.stage_dir("distill"))
    uri = storage.join(storage.current(stage_dir), "manifest.json")
    try:
        manifest = storage.load_json(uri)
    except FileNotFoundError:
        raise NotPrepared(f"no distilled data at {stage_dir}; run `raytune-app distill` first") from None
    except storage.Damaged as exc:
        raise NotPrepared(f"{exc}: the distilled data is incomplete; run `raytune-app distill` again") from None
    if manifest["fingerprint"] != _fingerprint(recipe, prepared_manifest(recipe)):
        raise NotPrepared(
            f"the distilled data in {stage_dir} was made from other data or distill settings; run "
            "`raytune-app distill` (or `raytune-app run`) first"
        )
    return manifest


def distill(recipe: Recipe, force: bool = False) -> dict:
    from raytune_app import models, outcomes
    from raytune_app.data.prepare import current_manifest as prepared_manifest
    from raytune_app.data.prepare import load_split

    prepared = prepared_manifest(recipe)
    if prepared["kind"] == "preference":
        raise DistillError("distill needs prompt_response or chat data (data.kind), not preference pairs")
    cfg = recipe.distill
    prepare_dir, out_dir = storage.absolute(recipe.stage_dir("prepare")), storage.absolute(recipe.stage_dir("distill"))
    fingerprint = _fingerprint(recipe, prepared)
    previous = (
        None if force else storage.unchanged(storage.join(storage.current(out_dir), "manifest.json"), fingerprint)
    )
    if previous is not None:
        console.logger("distill").info(f"unchanged inputs and settings: reusing {out_dir}")
        outcomes.note("distill", outcomes.REUSED)
        return previous
    started = time.time()
    table = load_split(prepare_dir, "train")
    rows = _inputs(table)
    from_columns = cfg.teacher.backend == "columns"
    if from_columns:  # the rationale (and label) of each row, from its kept columns
        rows = columns.attach(rows, table, cfg.teacher)
    if cfg.subsample < 1:
        # By content hash: the same rows at every run, and a smaller share is a subset of a larger one.
        rows = [r for r in rows if int(r["content_hash"][:8], 16) / 16**8 < cfg.subsample]
    if cfg.filter == "gold" and any(r["gold"] is None for r in rows):
        raise DistillError("distill.filter gold needs a gold answer on every train row; use self_consistency")
    dropped: list[dict] = []  # rows without a rationale, left out of both tasks (missing_rationale: drop)
    if from_columns:
        rows, dropped = columns.split_missing(rows, cfg.teacher.missing_rationale)

    identity = teacher_identity(recipe)
    requests = [
        {
            # The columns teacher's answer is the row's own text, not a function of the input: it is in the key.
            "key": _hash(
                [identity, row["input"], sample] + ([row["rationale_text"], row["label_text"]] if from_columns else [])
            ),
            "input": row["input"],
            "sample": sample,
            "prompt": _teacher_prompt(recipe, row["input"]),
        }
        | ({"rationale_text": row["rationale_text"], "label_text": row["label_text"]} if from_columns else {})
        for row in rows
        for sample in range(cfg.samples)
    ]
    cache = TeacherCache(cfg.cache_dir or storage.join(recipe.run_dir, "distill-cache"))
    todo = [r for r in requests if r["key"] not in cache.entries]
    console.logger("distill").info(
        f"{len(rows)} inputs x {cfg.samples} sample(s): {len(requests) - len(todo)} cached, {len(todo)} "
        f"to ask the {cfg.teacher.backend} teacher"
    )
    answers = _ask_teacher(recipe, todo, cache) if todo else {}
    cache.compact()
    errors = Counter(error.split(":")[0] for _, error in answers.values() if error)

    label_chats: list = []
    rationale_chats: list = []
    rejected: list[dict] = [
        {"content_hash": r["content_hash"], "input": r["input"], "gold": r["gold"], "reason": parse.NO_RATIONALE}
        for r in dropped
    ]
    reasons: Counter[str | None] = Counter({parse.NO_RATIONALE: len(dropped)} if dropped else {})
    for i, row in enumerate(rows):
        samples = []
        for sample in range(cfg.samples):
            key = requests[i * cfg.samples + sample]["key"]
            text = cache.entries.get(key, answers.get(key, (None, None))[0])
            samples.append(parse.parse(text, cfg.answer_markers))
        kept, reason = parse.decide(row["gold"], samples, cfg.filter, cfg.min_agreement)
        if kept is None and from_columns and row["rationale_text"] is None:
            reason = parse.NO_RATIONALE  # missing_rationale: label_only; the label task below still has it
        prefix_messages = row["messages"][:-1] if row["gold"] is not None else row["messages"]
        if kept is None:
            reasons[reason] += 1
            first = requests[i * cfg.samples]["key"]
            rejected.append(
                {
                    "content_hash": row["content_hash"],
                    "input": row["input"],
                    "gold": row["gold"],
                    "reason": reason,
                    "teacher_text": cache.entries.get(first, answers.get(first, (None, None))[0]),
                }
            )
        else:
            rationale_chats.append(
                (
                    prefix_last_user(prefix_messages, cfg.rationale_prefix)
                    + [{"role": "assistant", "content": kept["rationale"]}],
                    row["content_hash"],
                )
            )
        label = row["gold"] if cfg.label_source == "gold" else (kept or {}).get("label")
        if label is not None:
            label_chats.append(
                (
                    prefix_last_user(prefix_messages, cfg.label_prefix) + [{"role": "assistant", "content": label}],
                    row["content_hash"],
                )
            )

    tokenizer = models.load_tokenizer(
        recipe.model.path, recipe.model.tokenizer, recipe.model.chat_template, recipe.model.trust_remote_code
    )
    chats = label_chats + rationale_chats
    tasks = ["label"] * len(label_chats) + ["rationale"] * len(rationale_chats)
    train, dropped_train = _tokenised(
        tokenizer,
        [c for c, _ in chats],
        tasks,
        [h for _, h in chats],
        recipe.data.max_seq_length,
        recipe.data.truncation,
    )
    val_rows = _inputs(load_split(prepare_dir, "val"))
    val_chats = [prefix_last_user(r["messages"][:-1], cfg.label_prefix) + [r["messages"][-1]] for r in val_rows]
    val, dropped_val = _tokenised(
        tokenizer,
        val_chats,
        ["label"] * len(val_chats),
        [r["content_hash"] for r in val_rows],
        recipe.data.max_seq_length,
        recipe.data.truncation,
    )

    task_counts = Counter(train.column("task").to_pylist())
    manifest = {
        "stage": "distill",
        "fingerprint": fingerprint,
        "version": __version__,
        "kind": prepared["kind"],
        "packed": False,
        "prepared_fingerprint": prepared["fingerprint"],
        "teacher": identity,
        "filter": cfg.filter,
        "samples": cfg.samples,
        "inputs": len(rows),  # after missing_rationale: drop, which counts its rows as rejected no_rationale
        "kept_rationales": len(rationale_chats),
        "rejected": dict(sorted(reasons.items())),
        "keep_rate": round(len(rationale_chats) / max(1, len(rows)), 4),
        "teacher_calls": len(todo),
        "cache_hits": len(requests) - len(todo),
        "teacher_errors": dict(errors),
        "dropped_by_tokenizer": dict(dropped_train + dropped_val),
        "rows_out": {"train": train.num_rows, "val": val.num_rows},
        "tasks": dict(task_counts),
        "seconds": round(time.time() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Built as a new version and swapped in whole: a killed run leaves the previous output in place.
    with storage.new_version(out_dir, "the distilled data") as staging:
        _write_split(staging, "train", train)
        _write_split(staging, "val", val)
        storage.write_text(
            storage.join(staging, "rejected.jsonl"),
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected),
        )
        storage.write_text(storage.join(staging, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    cached = len(requests) - len(todo)
    if cached and todo:
        outcomes.note("distill", outcomes.RESUMED, f"{cached} teacher answers from the cache, {len(todo)} asked")
    else:
        outcomes.note("distill", outcomes.RECOMPUTED, f"{cached} teacher answers from the cache, {len(todo)} asked")
    console.logger("distill").info(
        f"kept {len(rationale_chats)}/{len(rows)} rationales ({manifest['keep_rate']:.0%}); rejected "
        f"{dict(reasons) or 'none'}; {manifest['rows_out']['train']} train examples "
        f"({task_counts.get('label', 0)} label, {task_counts.get('rationale', 0)} rationale) -> {out_dir}"
    )
    return manifest


def _write_split(staging: str, split: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    target = storage.join(staging, split, "part-0.parquet")
    fs, path = storage.filesystem(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
