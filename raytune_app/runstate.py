"""What to do with an earlier run in a stage's folder: reuse it, continue it, or move it aside.

The train stage (runs/<name>/train/) and the tune stage (runs/<name>/tune/) keep the same two
records: a *start* record written before any work (`run.json` / `search.json`) and a *finished*
record written last (`manifest.json` / `summary.json`), each holding the run's fingerprint (a hash
of the recipe sections and the data it ran on). `decide` reads them and:

    --restart, earlier run there       move it aside (`<folder>.previous-<fingerprint>-<time>/`), start anew
    finished, same fingerprint         reuse it (with --resume: reuse it, or refuse, as the stage says)
    started, other fingerprint         move it aside (with --resume: refuse, the recipe or data changed)
    started, same fingerprint          continue it (from its latest checkpoint)
    nothing there                      start (with --resume: refuse, nothing to resume)

An earlier run is never overwritten. Pure file logic through raytune_app/storage.py (local paths
and s3:// / gs:// alike); no Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from raytune_app import storage
from raytune_app.errors import DataError


@dataclass(frozen=True)
class RunRecords:
    """The record files of one stage, and the words its messages use."""

    started: str  # e.g. "run.json": written before any work
    finished: str  # e.g. "manifest.json": written last
    noun: str  # "run", "search"
    start_hint: str  # what dropping --resume does: "start training", "start the search"
    # A finished run with --resume: "reuse" it (the train stage: a chain resumes its later steps) or
    # "refuse" (the tune stage: --resume on a finished search is a mistake worth naming).
    finished_on_resume: Literal["reuse", "refuse"] = "reuse"


@dataclass(frozen=True)
class RunState:
    """The outcome of `decide`: `finished` is the finished run's record to reuse (nothing to run), else
    `resuming` says whether an interrupted run continues (True) or a new one starts (False). `how` and
    `why` say the same in words for the run's summary: reused / resumed / recomputed, and the reason."""

    finished: dict | None
    resuming: bool
    how: Literal["reused", "resumed", "recomputed"] = "recomputed"
    why: str = ""


def decide(
    out_dir: str,
    current: str,
    records: RunRecords,
    *,
    resume: bool = False,
    restart: bool = False,
    error: type[DataError] = DataError,
    log: Callable[[str], None] = print,
    damaged: Callable[[dict], str | None] | None = None,
    unresumable: Callable[[], tuple[str, str] | None] | None = None,
) -> RunState:
    """Settle the earlier run in `out_dir` against the fingerprint `current` (see the module docstring).
    Raises `error` (the stage's own error class) when --resume cannot be honoured; writes the start record
    of a new run; moves stale runs aside and says so through `log`. `damaged(finished record)` may name a
    problem with a finished run's output (weights cut short by a crash): such a run is continued from its
    latest checkpoint instead of reused. `unresumable()` may name what stops an interrupted run from
    continuing, as ("state", why) when the run's checkpoint record is cut short (the run is moved aside and
    starts again) or (anything else, why) when a checkpoint itself is damaged (refused: `error`)."""
    noun = records.noun
    finished = storage.read_json(storage.join(out_dir, records.finished))
    started = storage.read_json(storage.join(out_dir, records.started))
    if restart and (started or finished) is not None:  # a finished run whose start record is gone too
        aside = storage.move_aside(out_dir, (started or finished)["fingerprint"])
        log(f"--restart: the earlier {noun} was moved to {aside}")
        finished = started = None
    same_finished = finished is not None and finished["fingerprint"] == current
    if same_finished and damaged is not None:
        problem = damaged(finished)
        if problem is not None:
            log(f"{problem}: continuing the {noun} from its latest checkpoint to make its output again")
            storage.remove(storage.join(out_dir, records.finished))
            started, finished, same_finished = started or {"fingerprint": current}, None, False
    if same_finished and (not resume or records.finished_on_resume == "reuse"):
        return RunState(finished=finished, resuming=False, how="reused")
    if started is None and finished is not None:  # the start record lost: the finished one says whose run it is
        started = {"fingerprint": finished["fingerprint"]}
    moved = ""  # why an earlier run was moved aside
    if started is not None and started["fingerprint"] != current:
        if resume:
            raise error(
                f"cannot resume: the recipe or the prepared data changed since the {noun} in {out_dir} started "
                f"(fingerprint {started['fingerprint']}, now {current}); drop --resume to start a new {noun}"
            )
        aside = storage.move_aside(out_dir, started["fingerprint"])
        log(f"recipe or data changed: the earlier {noun} was moved to {aside}")
        started, moved = None, "recipe or data changed"
    if same_finished:  # and resume, which this stage refuses for a finished run
        raise error(f"nothing to resume: the {noun} in {out_dir} is finished; drop --resume to see its results")
    if started is None and resume:
        raise error(f"nothing to resume in {out_dir}; drop --resume to {records.start_hint}")
    blocker = unresumable() if started is not None and unresumable is not None else None
    if blocker is not None and blocker[0] == "state":
        # The record of the checkpoints is cut short: kept, moved aside, and the run starts again.
        aside = storage.move_aside(out_dir, started["fingerprint"])
        log(f"{blocker[1]}; the {noun} cannot be resumed: moved to {aside}, starting from step 0")
        started, moved = None, "its checkpoint record was damaged"
    elif blocker is not None:
        raise error(
            f"cannot resume the {noun} in {out_dir}: {blocker[1]}. It will not continue from a damaged "
            f"checkpoint; use --restart to move it aside and start from step 0"
        )
    if started is not None:
        return RunState(finished=None, resuming=True, how="resumed", why="from its latest checkpoint")
    storage.write_text(
        storage.join(out_dir, records.started), json.dumps({"fingerprint": current, "started": time.time()})
    )
    why = "--restart" if restart else (moved or f"no earlier {noun}")
    return RunState(finished=None, resuming=False, how="recomputed", why=why)
