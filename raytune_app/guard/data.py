"""Labelled prompts for the guard: read and checked from JSONL / CSV / Parquet, plus the shipped sets.

    rows = read_labelled("eval.jsonl", text_field="prompt", label_field="label")   # raises GuardDataError
    rows = training_rows(recipe)     # authored (+ obfuscated, contrast) + bastioncorpus + sources / optional_sources

Every row becomes {"text", "label" (1 attack, 0 benign), "attack_type", "source"}. A row with a
missing or empty text, a missing label or a label that is not binary stops the read with an error
naming the file, the line (or Parquet row) and the field, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import os

from raytune_app import storage
from raytune_app.config import Recipe
from raytune_app.errors import DataError

ATTACK_WORDS = {"1", "true", "attack", "malicious", "injection", "jailbreak", "unsafe"}
BENIGN_WORDS = {"0", "false", "benign", "safe"}


class GuardDataError(DataError):
    """Labelled data the guard cannot use; the message names the file, row and field."""


def _label(value, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    word = str(value).strip().casefold() if value is not None else ""
    if word in ATTACK_WORDS:
        return 1
    if word in BENIGN_WORDS:
        return 0
    raise GuardDataError(f"{where}: label {value!r} is not binary; use 1 / attack / malicious or 0 / benign")


def _records(uri: str):
    """(row number, record, or None when the row is not JSON) for a JSONL, CSV or Parquet file."""
    from raytune_app.data.rows import RowProblem, parse_json_line
    from raytune_app.data.sources import raw_rows

    for number, raw in raw_rows(uri):
        try:
            yield number, parse_json_line(raw)
        except RowProblem:
            yield number, None


def read_labelled(
    path: str, text_field: str = "text", label_field: str = "label", attack_type_field: str | None = "attack_type"
) -> list[dict]:
    """Every row of a labelled JSONL / CSV / Parquet file, checked; the first bad row raises GuardDataError."""
    from raytune_app.data.prepare import describe_row

    uri = storage.absolute(path)
    if not storage.exists(uri):
        raise GuardDataError(f"{path}: no such file")
    rows = []
    for number, record in _records(uri):
        where = lambda field, number=number: describe_row(uri, number, field, "").rstrip(": ")  # noqa: E731
        if not isinstance(record, dict):
            raise GuardDataError(f"{where(None)}: not a JSON object; fix or remove the line")
        text = record.get(text_field)
        if not isinstance(text, str) or not text.strip():
            have = ", ".join(sorted(record)) or "nothing"
            raise GuardDataError(
                f"{where(text_field)}: missing or empty text (the row has: {have}); "
                "point --text-field / guard.text_field at the prompt column"
            )
        if record.get(label_field) is None:
            raise GuardDataError(f"{where(label_field)}: missing label; every row needs 1 (attack) or 0 (benign)")
        kind = record.get(attack_type_field) if attack_type_field else None
        rows.append(
            {
                "text": text,
                "label": _label(record[label_field], where(label_field)),
                "attack_type": None if kind is None else str(kind),
                "source": os.path.basename(uri),
            }
        )
    if not rows:
        raise GuardDataError(f"{path}: no rows")
    return rows


def bastioncorpus_rows() -> list[dict]:
    import importlib.util

    spec = importlib.util.find_spec("bastioncorpus")
    if spec is None or not spec.submodule_search_locations:
        raise GuardDataError("guard.include_bastioncorpus needs the `bastioncorpus` package: pip install bastioncorpus")
    path = os.path.join(list(spec.submodule_search_locations)[0], "corpus", "injections.jsonl")
    rows = read_labelled(path, text_field="text", label_field="label", attack_type_field="category")
    return [r | {"source": "bastioncorpus"} for r in rows]


def training_rows(recipe: Recipe) -> list[dict]:
    """The guard's training set: authored, obfuscated, contrast, quoted-phrase and code rows, bastioncorpus and
    guard.sources, exact duplicates dropped."""
    from raytune_app.guard import authored

    cfg = recipe.guard
    rows = (
        authored.generate(cfg.authored_rows, seed=recipe.run.seed, ordinary_share=cfg.authored_ordinary_share)
        if cfg.authored_rows
        else []
    )
    if cfg.obfuscated_rows:
        from raytune_app.guard.robustness import obfuscated_rows

        rows += obfuscated_rows(cfg.obfuscated_rows, seed=recipe.run.seed)
    if cfg.contrast_rows:
        from raytune_app.guard.contrast import contrast_rows

        rows += contrast_rows(cfg.contrast_rows, seed=recipe.run.seed)
    if cfg.quoted_phrase_rows:
        from raytune_app.guard.quoted_phrases import quoted_phrase_rows

        rows += quoted_phrase_rows(cfg.quoted_phrase_rows, seed=recipe.run.seed)
    if cfg.code_rows:
        from raytune_app.guard.code_rows import code_rows

        rows += code_rows(cfg.code_rows, seed=recipe.run.seed)
    if cfg.include_bastioncorpus:
        rows += bastioncorpus_rows()
    files = [(source, True) for source in cfg.sources] + [(source, False) for source in cfg.optional_sources]
    types_read: set[str | None] = set()
    for source, required in files:
        path = recipe.resolve_source(source)
        if not required and not storage.exists(storage.absolute(path)):
            from raytune_app import console

            console.logger("guard").info(f"guard.optional_sources: {source} is not here; training without it")
            continue
        read = read_labelled(path, cfg.text_field, cfg.label_field, cfg.attack_type_field)
        types_read |= {r["attack_type"] for r in read}
        read = relabel_benign(read, cfg.benign_attack_types)
        rows += cap_per_type(read, cfg.max_rows_per_type) if cfg.max_rows_per_type else read
    unmatched = [t for t in cfg.benign_attack_types if t not in types_read]
    if unmatched and types_read:  # a misspelt type would silently leave those rows labelled as attacks
        from raytune_app import console

        console.logger("guard").warning(
            f"guard.benign_attack_types: no row of attack type {', '.join(map(repr, unmatched))} in the sources "
            f"read (their types: {', '.join(sorted(str(t) for t in types_read))})"
        )
    seen, unique = set(), []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            unique.append(row)
    if len({r["label"] for r in unique}) < 2:
        raise GuardDataError("the guard's training rows hold only one class; it needs attacks and benign prompts")
    return unique


def relabel_benign(rows: list[dict], benign_types: list[str]) -> list[dict]:
    """Rows of the attack types a source labels wrongly (guard.benign_attack_types) with label 0; the others as
    they are. The benchmark applies the same to the public val set for its corrected table."""
    return [r | {"label": 0} if r["attack_type"] in benign_types else r for r in rows]


def cap_per_type(rows: list[dict], cap: int) -> list[dict]:
    """At most `cap` distinct texts of each attack_type (the lowest text hashes: stable when the file grows),
    in the file's order; repeated texts are dropped here (a public split can repeat a template's prompt)."""
    by_type: dict[str | None, list[dict]] = {}
    seen: set[str] = set()
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            by_type.setdefault(row["attack_type"], []).append(row)
    kept = set()
    for group in by_type.values():
        group = sorted(group, key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())
        kept |= {id(r) for r in group[:cap]}
    return [r for r in rows if id(r) in kept]


def split(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val) by a hash of the text: stable when rows are added or reordered."""

    def bucket(text: str) -> float:
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8

    val = [r for r in rows if bucket(r["text"]) < val_fraction]
    train = [r for r in rows if bucket(r["text"]) >= val_fraction]
    return train, val


def split_for_training(rows: list[dict], recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """(train, val) as guard training uses them: `split` by hash, then guard.augmented_rows disguised copies
    of training rows added to the training side only (validation, and so the threshold, never sees a disguised
    twin of a training row). The benchmark calls this too, so its baseline learns from the same rows."""
    cfg = recipe.guard
    train, val = split(rows, cfg.val_fraction)
    if cfg.augmented_rows:
        from raytune_app.guard.contrast import augmented_copies

        train = train + augmented_copies(train, cfg.augmented_rows, seed=recipe.run.seed)
    return train, val
