"""The `columns` teacher: rationales (and optionally labels) that are already in the data, read from
columns of the prepared rows instead of asked of a model.

    distill:
      teacher: {backend: columns, rationale_column: rationale, missing_rationale: label_only}

Human-written rationales (e-SNLI's explanations, GSM8K's worked solutions: raytune_app/data/public.py)
are what the Distilling Step-by-Step paper compares LLM rationales against, and they cost no teacher
time. The columns reach the distill stage through `data.keep_columns` (prepare carries them into the
prepared splits). Each row's rationale and label are written as one teacher text ("<rationale> So the
answer is <label>.") so they take the same path as a model's answer: the same parse, filter, cache,
rejection counts and multi-task rows (raytune_app/distill/run.py). The label is the gold label unless
`label_column` names another one (an annotator's label, checked against the gold one by `filter: gold`).

Pure functions (no Ray): `attach` runs on the driver, `run_columns` is the Ray Data map step.
"""

from __future__ import annotations

import pyarrow as pa

from raytune_app.distill.parse import NO_RATIONALE
from raytune_app.errors import DataError

NO_LABEL = "no_label"


class ColumnsError(DataError):
    """A columns teacher whose column the prepared rows lack; the message names the option and the column."""


def _text(value) -> str | None:
    """A cell as text, None when it holds nothing (null, empty or only spaces)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def attach(rows: list[dict], table: pa.Table, teacher) -> list[dict]:
    """The rows (from the prepared train split `table`, in its order) with `rationale_text` and
    `label_text` set from the teacher's columns; a column the table lacks is an error naming it."""
    wanted = [("rationale_column", teacher.rationale_column)]
    if teacher.label_column is not None:
        wanted.append(("label_column", teacher.label_column))
    values = {}
    for option, column in wanted:
        if column not in table.column_names:
            kept = sorted(set(table.column_names) - {"messages", "content_hash", "input_ids", "completion_mask"})
            raise ColumnsError(
                f"distill.teacher.{option}: the prepared rows have no column `{column}` (they have: "
                f"{', '.join(kept) or 'no kept columns'}); list it in data.keep_columns and run prepare again"
            )
        values[option] = table.column(column).to_pylist()
    out = []
    for i, row in enumerate(rows):
        label = _text(values["label_column"][i]) if "label_column" in values else row["gold"]
        out.append(row | {"rationale_text": _text(values["rationale_column"][i]), "label_text": label})
    return out


def split_missing(rows: list[dict], policy: str) -> tuple[list[dict], list[dict]]:
    """(rows to distill, rows left out): `drop` leaves out the rows without a rationale; `label_only` keeps
    them all (they get no rationale row, and their label row keeps the label-only baseline complete)."""
    if policy == "label_only":
        return rows, []
    return [r for r in rows if r["rationale_text"] is not None], [r for r in rows if r["rationale_text"] is None]


def teacher_text(rationale: str | None, label: str | None, marker: str) -> tuple[str | None, str | None]:
    """(text, None) as a model teacher would have written it, or (None, error) when a part is missing."""
    if rationale is None:
        return None, f"{NO_RATIONALE}: the rationale column is empty"
    if label is None:
        return None, f"{NO_LABEL}: the label column is empty"
    return f"{rationale} {marker} {label}.", None


def run_columns(batch: pa.Table, marker: str) -> pa.Table:
    """The Ray Data step: `teacher_text` / `teacher_error` from the requests' `rationale_text` / `label_text`."""
    results = [
        teacher_text(_text(r), _text(lab), marker)
        for r, lab in zip(batch.column("rationale_text").to_pylist(), batch.column("label_text").to_pylist())
    ]
    return batch.append_column("teacher_text", pa.array([t for t, _ in results], pa.string())).append_column(
        "teacher_error", pa.array([e for _, e in results], pa.string())
    )
