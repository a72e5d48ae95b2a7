"""Weighted mixing of sources: how many times each training example is used (pure functions + one batch step).

A source with `weight` w contributes each of its training examples floor(w) times, plus once more with
probability w - floor(w), decided by a hash of the example and the run's seed: the same recipe draws the
same examples every time, and adding rows never changes which of the old ones are drawn. Validation and
test rows are used once whatever the weight (evaluation must not depend on the mix).

The batch step runs after tokenisation and before packing. Examples not drawn leave the pipeline; what was
available and what was used per source travels to the writer as one `mix_tally` row per source and batch,
so the manifest can state the realised mix even when the examples are packed.
"""

from __future__ import annotations

import hashlib
import json
import math

import pyarrow as pa
import pyarrow.compute as pc

TALLY = "mix_tally"


def copies(content_hash: str, weight: float, seed: int) -> int:
    """How many times one training example is used under `weight`."""
    whole = math.floor(weight)
    digest = hashlib.blake2b(f"{seed}\x00{content_hash}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(digest, "big") / 2**64 < weight - whole)


def mix_batch(batch: pa.Table, weights: dict[str, float], seed: int) -> pa.Table:
    """Repeat or drop the train rows of weighted sources; append one tally row per source seen."""
    ok_train = pc.fill_null(pc.and_(pc.equal(batch["status"], "ok"), pc.equal(batch["split"], "train")), False)
    files, hashes = batch["source_file"].to_pylist(), batch["content_hash"].to_pylist()
    take: list[int] = []
    tally: dict[str, list[int]] = {}
    for i, is_train in enumerate(ok_train.to_pylist()):
        n = copies(hashes[i], weights.get(files[i], 1.0), seed) if is_train else 1
        if is_train:
            seen = tally.setdefault(files[i], [0, 0])
            seen[0] += 1
            seen[1] += n
        take.extend([i] * n)
    out = batch.take(pa.array(take, pa.int64()))
    if not tally:
        return out
    rows: dict[str, list] = {name: [None] * len(tally) for name in out.schema.names}
    rows["status"] = [TALLY] * len(tally)
    rows["source_file"] = list(tally)
    rows["source_row"] = [0] * len(tally)
    rows["message"] = [json.dumps({"available": a, "used": u}) for a, u in tally.values()]
    return pa.concat_tables([out, pa.Table.from_pydict(rows, schema=out.schema)])


def realised(tallies: dict[str, list[int]], weights: dict[str, float]) -> list[dict]:
    """The manifest's view of the mix: per file, train examples available, used, weight and share of the total."""
    total = sum(used for _, used in tallies.values()) or 1
    return [
        {
            "file": file,
            "weight": weights.get(file, 1.0),
            "available": available,
            "used": used,
            "share": round(used / total, 4),
        }
        for file, (available, used) in sorted(tallies.items())
    ]
