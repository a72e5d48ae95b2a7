"""What each stage did with its earlier output: reused it, resumed it, or recomputed it.

Stages call `note(...)` where they decide; `raytune-app run` prints the list at the end
(`summary_line`), so after a crash and a re-run the user sees what was kept and what was done again:

    [run] stages: prepare reused; train resumed (from its latest checkpoint); evaluate recomputed (no earlier output)

Kept in the driver process only (every decision is made on the driver).
"""

from __future__ import annotations

REUSED, RESUMED, RECOMPUTED = "reused", "resumed", "recomputed"

_notes: list[tuple[str, str, str]] = []


def note(stage: str, how: str, why: str = "") -> None:
    """Record that `stage` was `how` (reused / resumed / recomputed), with a short reason."""
    assert how in (REUSED, RESUMED, RECOMPUTED), how
    _notes.append((stage, how, why))


def take() -> list[tuple[str, str, str]]:
    """The notes recorded since the last call, in order; clears them."""
    out = list(_notes)
    _notes.clear()
    return out


def summary_line(notes: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{stage} {how}" + (f" ({why})" if why else "") for stage, how, why in notes) or "none run"


def label(recipe, stage: str) -> str:
    """The stage's name in the notes: `train[task]` for the step `task` of a chain."""
    chained = recipe.run.output_dir.rstrip("/").endswith("/chain")
    return f"{stage}[{recipe.run.name}]" if chained else stage
