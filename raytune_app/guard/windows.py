"""Overlapping windows over token ids, so a classifier with a short input reads a long prompt whole.

    windows(list(range(10)), size=4, stride=2)   # [[0..3], [2..5], [4..7], [6..9]]

The guard reads at most `max_length` tokens at once (128 for the default MiniLM guard). A prompt is
scored as windows of that size, each starting `stride` tokens after the last, the final one ending at the
last token; with stride = size / 2 any stretch of up to size / 2 tokens (a typical injection sentence is
15-40) lies whole inside some window, whatever precedes it. The prompt's score is its worst window's.
A text that fits is one window holding exactly the tokens plain truncation would give, so a short prompt
scores as it always did. Pure Python.
"""

from __future__ import annotations


def windows(ids: list[int], size: int, stride: int) -> list[list[int]]:
    """`ids` cut into windows of `size` tokens, `stride` apart, covering every token."""
    if size < 1 or not 1 <= stride <= size:
        raise ValueError(f"window size {size} / stride {stride}: need 1 <= stride <= size")
    if len(ids) <= size:
        return [ids]
    starts = list(range(0, len(ids) - size + 1, stride))
    if starts[-1] + size < len(ids):
        starts.append(len(ids) - size)
    return [ids[s : s + size] for s in starts]


def count(length: int, size: int, stride: int) -> int:
    """How many windows `windows` makes of `length` tokens (without making them)."""
    if length <= size:
        return 1
    full = (length - size) // stride + 1
    return full + (1 if (full - 1) * stride + size < length else 0)
