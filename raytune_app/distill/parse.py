"""Reading a teacher's text: rationale and label, label comparison, and the keep / reject decision.

Pure functions (no Ray), unit-tested on well-formed, malformed and truncated outputs. Teachers are
asked to end with an answer marker ("So the answer is 42."); the last marker in the text splits it.
Also the task prefix of a distilled student's prompts (`prefix_last_user`), which the distill stage
writes and evaluation (raytune_app/evaluate/generation.py) applies: kept here, below both.
"""

from __future__ import annotations

import re
from collections import Counter

from raytune_app.errors import DataError

REJECT_REASONS = (
    "teacher_error",
    "empty",
    "no_answer_marker",
    "empty_rationale",
    "empty_label",
    "label_mismatch",
    "no_majority",
    "no_rationale",  # the columns teacher: the row's rationale column is empty (distill.teacher.missing_rationale)
)
NO_RATIONALE = "no_rationale"


def parse(text: str | None, markers: list[str]) -> tuple[str | None, str | None, str | None]:
    """(rationale, label, None) for a usable teacher text, else (None, None, reject reason)."""
    if text is None:
        return None, None, "teacher_error"
    text = text.strip()
    if not text:
        return None, None, "empty"
    lowered = text.lower()
    # The last marker in the text; of markers ending at the same place ("So the answer is" and "the answer
    # is"), the longest.
    found = [(lowered.rfind(m.lower()), m) for m in markers]
    found = [(at, m) for at, m in found if at >= 0]
    if not found:
        return None, None, "no_answer_marker"  # also a reply cut off before it reached the answer
    at, marker = max(found, key=lambda f: (f[0] + len(f[1]), len(f[1])))
    rationale = text[:at].strip()
    label = text[at + len(marker) :].strip()
    label = re.split(r"\n", label, maxsplit=1)[0].strip()
    label = label.lstrip(":").strip().rstrip(".").strip().strip("*").strip()
    if not rationale:
        return None, None, "empty_rationale"
    if not label:
        return None, None, "empty_label"
    return rationale, label, None


def normalise(label: str) -> str:
    """A label for comparison: case, surrounding punctuation and quotes, thousands separators, `42.0`."""
    value = label.strip().rstrip(".").strip().strip("\"'`").strip().rstrip(".").lower()
    number = value.replace(",", "").replace("$", "")
    try:
        as_float = float(number)
        return str(int(as_float)) if as_float.is_integer() else str(as_float)
    except ValueError:
        return re.sub(r"\s+", " ", value)


def majority(labels: list[str], samples: int, min_agreement: float) -> str | None:
    """The (normalised) label that more than `min_agreement` of all `samples` agree on, else None; samples
    that did not parse count as votes for nothing."""
    if not labels:
        return None
    top, votes = Counter(normalise(label) for label in labels).most_common(1)[0]
    return top if votes / samples > min_agreement else None


def decide(
    gold: str | None,
    samples: list[tuple[str | None, str | None, str | None]],
    policy: str,
    min_agreement: float,
) -> tuple[dict | None, str | None]:
    """Which of an input's parsed teacher samples to keep: ({rationale, label}, None) or (None, reason).

    `gold`: a sample whose label matches the gold label; `self_consistency`: a sample agreeing with the
    majority label; `none`: the first parsed sample."""
    parsed = [(r, label) for r, label, reason in samples if reason is None and r is not None and label is not None]
    if not parsed:
        reasons = [reason for _, _, reason in samples]
        return None, Counter(reasons).most_common(1)[0][0]
    if policy == "gold":
        if gold is None:
            raise DataError("filter gold needs a gold label for every row; use self_consistency for unlabeled data")
        for rationale, label in parsed:
            if normalise(label) == normalise(gold):
                return {"rationale": rationale, "label": label}, None
        return None, "label_mismatch"
    if policy == "self_consistency":
        top = majority([label for _, label in parsed], len(samples), min_agreement)
        if top is None:
            return None, "no_majority"
        rationale, label = next((r, lab) for r, lab in parsed if normalise(lab) == top)
        return {"rationale": rationale, "label": label}, None
    rationale, label = parsed[0]
    return {"rationale": rationale, "label": label}, None


def prefix_last_user(messages: list[dict], prefix: str) -> list[dict]:
    """A copy of the chat with `prefix` before the last user message (the task prefix of a distilled student)."""
    out = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = prefix + out[last]["content"]
    return out
