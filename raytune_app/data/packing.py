"""Sequence packing for SFT: several tokenised examples per training sequence.

Best-fit decreasing: examples are taken longest first and each goes into the open sequence with the
least room that still holds it. No example is ever split across sequences. Each packed row records
`seq_lengths` (the length of each example inside it); TRL's collator turns those into position ids
that restart at 0 for every example, and transformers builds a block-diagonal causal mask from them,
so attention never crosses from one example into another.

Pure Python (no Ray); `prepare.py` applies it per Ray Data batch and per split.
"""

from __future__ import annotations

import bisect

from raytune_app.errors import DataError


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose sums stay within `capacity`.

    Every length must be at most `capacity` (prepare drops or truncates longer examples first).
    """
    if any(length > capacity for length in lengths):
        raise DataError(f"an example of {max(lengths)} tokens cannot be packed into sequences of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Open bins as (room left, bin number), kept sorted so the tightest fit is a bisect away.
    room: list[tuple[int, int]] = []
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            left, number = capacity - lengths[i], len(bins) - 1
        else:
            left, number = room.pop(at)
            bins[number].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(room, (left, number))
    return bins


def pack(examples: list[dict], capacity: int) -> list[dict]:
    """Pack examples ({input_ids, completion_mask, content_hash}) into rows of at most `capacity` tokens."""
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], capacity)
    packed = []
    for members in bins:
        members = sorted(members)  # keep source order inside a sequence: easier to read, same maths
        packed.append(
            {
                "input_ids": [t for i in members for t in examples[i]["input_ids"]],
                "completion_mask": [m for i in members for m in examples[i]["completion_mask"]],
                "seq_lengths": [len(examples[i]["input_ids"]) for i in members],
                "example_hashes": [examples[i]["content_hash"] for i in members],
            }
        )
    return packed
