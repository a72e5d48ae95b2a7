"""Preference pairs from a model's own mistakes: SFT -> evaluate -> DPO in one recipe.

    raytune-app pairs --recipe R [--adapter DIR|models:/name@alias] [--split train] [--out FILE]
    or a chain step with `pairs:` (raytune_app/train/run.py:train_chain builds them before the step)

The model answers the prompts of a prepared split (the training split by default: the pairs teach
on data the model trained on, never on the test split the evaluation reports) with the evaluate
stage's generator on a Ray Data actor pool; each answer is scored with the evaluate stage's own
task metric (structured: the JSON equals the reference; free_text: normalised match; classification:
the label). Every failing answer becomes a pair: chosen = the reference (or a passing sample of the
same prompt), rejected = the model's answer. Rows are written as JSONL with `prompt`, `system`,
`chosen`, `rejected`, plus `example` and `reason` for tracing; prepare then reads them as preference
data, with the same validation as any other preference file.

Output beside the pairs: pairs.json (counts: prompts, answers, passing, failing, pairs; fingerprint).
Unchanged inputs (weights, data, settings) reuse the file.
"""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow as pa

from raytune_app import console, storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError
from raytune_app.train.settings import PairsSection

# The row-level column of evaluate.run.score that says an answer is right, by evaluate.task.
PASSES = {"structured": "exact_match", "free_text": "normalised_match", "classification": "correct"}


def _fingerprint(recipe: Recipe, weights_identity: str, data_identity: str, settings: PairsSection) -> str:
    payload = {
        "weights": weights_identity,
        "data": data_identity,
        "pairs": settings.model_dump(mode="json"),
        "model": recipe.model.model_dump(mode="json"),
        "generation": recipe.evaluate.model_dump(mode="json", include={"task", "max_new_tokens", "labels"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _prompt_parts(messages: list[dict]) -> tuple[str | None, str]:
    """(system, last user message) of a prompt; earlier turns of a multi-turn chat are not kept."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return system, user


def select_pairs(rows: list[dict], settings: PairsSection) -> tuple[list[dict], dict]:
    """Pairs from scored answers. `rows`: {example, prompt (messages), gold, prediction, passes}, several
    per example when sampled. Returns (pairs, counts)."""
    by_example: dict[str, list[dict]] = {}
    for row in rows:
        by_example.setdefault(row["example"], []).append(row)
    pairs, counts = (
        [],
        {
            "prompts": len(by_example),
            "answers": len(rows),
            "passing": 0,
            "failing": 0,
            "empty_answers": 0,
            "pairs": 0,
            "prompts_with_pairs": 0,
        },
    )
    for example, answers in by_example.items():
        passing = [a for a in answers if a["passes"]]
        counts["passing"] += len(passing)
        failing, seen = [], set()
        for answer in answers:
            if answer["passes"]:
                continue
            counts["failing"] += 1
            text = answer["prediction"].strip()
            if not text:
                counts["empty_answers"] += 1  # nothing to learn against; prepare would reject it anyway
                continue
            if text not in seen and text != answer["gold"].strip():
                seen.add(text)
                failing.append(text)
        if not failing:
            continue
        chosen = answers[0]["gold"]
        reason = "reference"
        if settings.chosen == "passing_sample" and passing:
            chosen, reason = passing[0]["prediction"].strip(), "passing_sample"
        system, user = _prompt_parts(answers[0]["prompt"])
        for rejected in failing[: settings.max_pairs_per_prompt]:
            pairs.append(
                {
                    "prompt": user,
                    "system": system,
                    "chosen": chosen,
                    "rejected": rejected,
                    "example": example,
                    "chosen_from": reason,
                }
            )
        counts["prompts_with_pairs"] += 1
    counts["pairs"] = len(pairs)
    return pairs, counts


def build_pairs(
    recipe: Recipe, weights: str | None, weights_identity: str, settings: PairsSection, out_dir: str
) -> dict:
    """Answer `recipe`'s prepared `settings.split` with `weights` (None: the base model), write the
    pairs to `<out_dir>/pairs.jsonl`; returns the counts (also written to `<out_dir>/pairs.json`)."""
    from raytune_app.evaluate import run as ev_run

    say = lambda text: console.logger("pairs").info(f"{text}")  # noqa: E731
    examples, data_identity = ev_run.prepared_examples(recipe, settings.split)
    if settings.limit is not None:
        examples = examples.slice(0, settings.limit)
    validator = ev_run.load_schema(recipe) if recipe.evaluate.task == "structured" else None
    labels = None
    if recipe.evaluate.task == "classification":
        labels = recipe.evaluate.labels or sorted(set(examples.column("gold").to_pylist()))
    out_file, manifest_uri = storage.join(out_dir, "pairs.jsonl"), storage.join(out_dir, "pairs.json")
    fingerprint = _fingerprint(recipe, weights_identity, data_identity, settings)
    previous = storage.unchanged(manifest_uri, fingerprint)
    if previous is not None and storage.exists(out_file):
        say(f"model, data and settings unchanged: reusing {out_file} ({previous['pairs']} pairs)")
        return previous

    # Several samples per prompt: each copy of an example gets its own id (the generator keys rows by it).
    temperature = settings.temperature if settings.samples > 1 else 0.0
    ids = examples.column("example").to_pylist()
    copies = [
        examples.set_column(
            examples.column_names.index("example"), "example", pa.array([f"{e}#{k}" for e in ids], pa.string())
        )
        for k in range(settings.samples)
    ]
    asked = pa.concat_tables(copies)
    generating = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"temperature": temperature})})
    say(
        f"{examples.num_rows} prompts of the `{settings.split}` split x {settings.samples} answer(s) "
        f"(temperature {temperature}) from {weights or recipe.model.path}"
    )
    began = time.time()
    table = ev_run.generate(asked, ev_run.Candidate("pairs", weights, weights_identity), generating, labels)
    _, columns, _ = ev_run.score(recipe.evaluate.task, table, validator, labels)
    passes = columns[PASSES[recipe.evaluate.task]]
    rows = [
        {"example": e.rsplit("#", 1)[0], "prompt": p, "gold": g, "prediction": pred, "passes": bool(ok)}
        for e, p, g, pred, ok in zip(
            table.column("example").to_pylist(),
            table.column("prompt").to_pylist(),
            table.column("gold").to_pylist(),
            table.column("prediction").to_pylist(),
            passes,
        )
    ]
    pairs, counts = select_pairs(rows, settings)
    if not pairs:
        raise PairsError(
            f"the model passed every one of the {counts['answers']} answers (or wrote nothing): no pairs "
            f"to learn from; sample more (pairs.samples, pairs.temperature) or skip the DPO step"
        )
    storage.write_text(out_file, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    manifest = {
        "stage": "pairs",
        "fingerprint": fingerprint,
        "weights": weights,
        "split": settings.split,
        **counts,
        "pass_rate": round(counts["passing"] / counts["answers"], 6),
        "pairs_file": out_file,
        "seconds": round(time.time() - began, 1),
    }
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2) + "\n")
    say(
        f"{counts['pairs']} pairs from {counts['prompts_with_pairs']} of {counts['prompts']} prompts "
        f"(pass rate {manifest['pass_rate']:.3f}) -> {out_file}"
    )
    return manifest


class PairsError(DataError):
    """Pairs that cannot be made; says why and what to do."""
