"""Adapters for public data sets whose files are not one example per row in the shape prepare reads.

    path = materialise(recipe, source, folder_or_file)   # data.sources[i].adapter: esnli | gsm8k

Each adapter reads the data set in its published layout and writes it once as JSONL under
`<run dir>/source/` (named by the adapter, the split and the source files' path / size / mtime, so
unchanged files are not read again), with the columns prepare's `columns` layout reads by default:

- `prompt`: the input, `response`: the gold label, `rationale`: a human-written rationale (null where
  the data set has none), for the distill stage's `columns` teacher (raytune_app/distill/columns.py).
- `esnli` (OanaMariaCamburu/e-SNLI): a folder of line-aligned text files `s1.<split>` (premise),
  `s2.<split>` (hypothesis), `labels.<split>` and `preproc1_expl_{1,2,3}.<split>` (the train split has one
  explanation, dev / test three): prompt "Premise: ...\\nHypothesis: ...", response the label,
  `rationale` the first explanation, `rationale_2` / `rationale_3` the others where present.
- `gsm8k` (openai/grade-school-math): JSONL rows {question, answer} whose answer is a worked solution
  followed by `#### <number>`: prompt the question, response the number, rationale the solution with
  the `<<48/2=24>>` calculator annotations removed (they are for the original paper's calculator).

Output line N is source line N (blank and malformed lines are written through as they are), so a
rejected row's line number in prepare's rejected.jsonl is its line in the original files too.
Pure Python on the driver, before any Ray work (the sets are a few MB).
"""

from __future__ import annotations

import hashlib
import json
import re

from raytune_app import console, storage
from raytune_app.errors import DataError

# Bump when an adapter's output changes, so materialised files made by an older one are not reused.
ADAPTER_VERSION = 1
ESNLI_FIELDS = {
    "s1": "premise",
    "s2": "hypothesis",
    "labels": "label",
    "preproc1_expl_1": "rationale",
    "preproc1_expl_2": "rationale_2",
    "preproc1_expl_3": "rationale_3",
}
ESNLI_REQUIRED = ("s1", "s2", "labels", "preproc1_expl_1")
GSM8K_MARKER = "####"
_CALCULATOR = re.compile(r"<<[^<>]*>>")


class AdapterError(DataError):
    """A public data set that cannot be read by its adapter; the message names the file and the fix."""


def _lines(uri: str) -> list[str]:
    # splitlines() would also split on \x0b, \x1c, \u2028 ...: a premise holding one would shift every
    # later line out of alignment with the other files. Only \n separates rows in these files.
    text = storage.read_text(uri)
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines


def esnli_rows(folder: str, split: str) -> list[str]:
    """The e-SNLI files of one split, zipped line by line into JSONL rows (see the module docstring)."""
    present = {name: storage.join(folder, f"{name}.{split}") for name in ESNLI_FIELDS}
    present = {name: uri for name, uri in present.items() if storage.exists(uri)}
    missing = [f"{name}.{split}" for name in ESNLI_REQUIRED if name not in present]
    if missing:
        found = sorted({f.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for f in storage.list_files(folder, "")} - {""})
        raise AdapterError(
            f"adapter esnli: {folder} has no {', '.join(missing)} (the line-aligned e-SNLI files of split "
            f"{split!r}); set the source's `split` to one the folder has (suffixes found: {', '.join(found) or 'none'})"
        )
    columns = {ESNLI_FIELDS[name]: _lines(uri) for name, uri in present.items()}
    counts = {f"{name}.{split}": len(columns[ESNLI_FIELDS[name]]) for name in present}
    if len(set(counts.values())) != 1:
        raise AdapterError(
            f"adapter esnli: the files in {folder} are not line-aligned (lines: "
            f"{', '.join(f'{k} {v}' for k, v in counts.items())}); every file must have one line per example"
        )
    rows = []
    for values in zip(*columns.values()):
        row = {name: value.strip() or None for name, value in zip(columns, values)}
        premise, hypothesis = row.pop("premise"), row.pop("hypothesis")
        prompt = f"Premise: {premise}\nHypothesis: {hypothesis}" if premise and hypothesis else None
        rows.append(json.dumps({"prompt": prompt, "response": row.pop("label"), **row}, ensure_ascii=False))
    return rows


def gsm8k_row(line: str) -> str:
    """One GSM8K JSONL line as a prompt / response / rationale row; lines it cannot read pass through,
    so that prepare reports them (malformed JSON, a missing field) with their line number."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
        return line
    solution, marker, number = record["answer"].rpartition(GSM8K_MARKER)
    rationale = _CALCULATOR.sub("", solution).strip() if marker else None
    return json.dumps(
        {
            "prompt": record.get("question"),
            "response": number.strip().replace(",", "") if marker and number.strip() else None,
            "rationale": rationale or None,
        },
        ensure_ascii=False,
    )


def gsm8k_rows(path: str) -> list[str]:
    return [gsm8k_row(line) if line.strip() else line for line in _lines(path)]


def _source_files(adapter: str, given: str, split: str) -> list:
    if adapter == "esnli":
        return [f for f in storage.file_fingerprint(given) if f[0].rsplit("/", 1)[-1].endswith(f".{split}")]
    return storage.file_fingerprint(given)


def materialise(recipe, adapter: str, given: str, split: str) -> tuple[str, list]:
    """The JSONL file the adapter makes of `given` (written on first use; see the module docstring), and
    the identity of what it was made from (adapter, split and the source files' path / size / mtime)."""
    try:
        files = _source_files(adapter, given, split)
    except FileNotFoundError:
        files = []
    if not files:
        raise AdapterError(
            f"adapter {adapter}: {given} not found. The public data sets live outside the project "
            "(../shared/data, see its README) and are not shipped with it: point the source's `path` at your copy"
        )
    identity = [[f"adapter {adapter} v{ADAPTER_VERSION} {split}: {path}", size, mtime] for path, size, mtime in files]
    digest = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:12]
    target = storage.absolute(storage.join(recipe.run_dir, "source", f"{adapter}-{split}-{digest}.jsonl"))
    if not storage.exists(target):
        rows = esnli_rows(given, split) if adapter == "esnli" else gsm8k_rows(given)
        storage.write_text(target, "".join(row + "\n" for row in rows))  # written whole: never half a file
        console.logger("prepare").info(f"{given} ({adapter}, {split}): {len(rows)} rows written once as {target}")
    return target, identity
