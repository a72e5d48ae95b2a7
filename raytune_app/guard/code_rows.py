"""Code rows: questions about real source code, benign as written, and attacks with an instruction to the
assistant planted in the code as a comment or docstring.

    rows = code_rows(1400, seed=0)     # every second row an attack twin

Why: people paste code into assistants all day, and a guard that learned prompt injection from prose and
template payloads learns that code itself looks like an attack. The public guard trained without these rows
flagged 73% of benign questions about real third-party code (BENCHMARKS.md, "guard quality", session 14).
Real code brings what templates cannot: the names, comments and docstrings of working software, where
"ignore", "override", "system", "prompt", "bypass" and "execute" are everyday words. The attack twins keep
the guard reading what the code says rather than learning that code is safe.

Where the code comes from: the Python standard library of the interpreter that trains (sysconfig's `stdlib`
path; its test packages and site-packages left out), files in sorted order shuffled by `seed`, up to three chunks
of 5-16 lines cut from each. Nothing is copied into the project, and another Python version gives other code
(the same number of rows). An attack twin gets one line, a `#` comment or a docstring at the indentation of
the line it precedes, holding an instruction to the assistant (guard/contrast.py's injections, which include
the authored attack families). benchmarks/guard_quality.py measures on code this module never reads (the
installed third-party packages) with question frames of its own.
"""

from __future__ import annotations

import functools
import os
import random
import re
import sysconfig
from pathlib import Path

from raytune_app.guard import contrast

# {c}: the chunk; {module}: its path inside the standard library.
_QUESTIONS = [
    "{c}",
    "```python\n{c}\n```",
    "Explain this:\n{c}",
    "what is this function for?\n\n```py\n{c}\n```",
    "Please clean up this code and keep it working:\n\n```python\n{c}\n```",
    "Convert the following to Go.\n\n{c}",
    "I'm reading the CPython source. Can you walk me through this part?\n\n```python\n{c}\n```",
    "```python\n{c}\n```\n\nHow would I test this?",
    "Spot the edge cases in this code:\n{c}",
    "Document this with comments:\n```python\n{c}\n```",
    "can you make this faster\n\n{c}",
    "Review this change before I merge it:\n\n```python\n{c}\n```\nAnything risky?",
    "Here's a bit of {module}:\n\n{c}\n\nWhat would break if I deleted it?",
    "Give me a one-paragraph summary of this code for a changelog:\n```python\n{c}\n```",
]
_CHUNKS_PER_FILE = 3


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's own .py files, sorted: its test packages and site-packages left out (not walked
    into: they hold most of the folder). Listed once per process: a recipe's rows and its checks ask again."""
    root = stdlib_root()
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in {"test", "tests", "idle_test", "site-packages"}]
        found.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return tuple(sorted(found))


def _planted(lines: list[str], rng: random.Random) -> list[str]:
    """`lines` with an instruction to the assistant inserted before one of them, as a comment or a docstring."""
    at = rng.randrange(0, len(lines))
    indent = re.match(r"\s*", lines[at]).group(0)  # type: ignore[union-attr]  # \s* always matches
    instruction = " ".join(contrast._injection(rng).split())
    line = f"# {instruction}" if rng.random() < 0.7 else f'"""{instruction}"""'
    return lines[:at] + [indent + line] + lines[at:]


def code_rows(rows: int, seed: int = 0) -> list[dict]:
    """`rows` distinct questions about standard-library code: even rows benign (`benign_code`), odd rows the
    attack twin with a planted instruction (`code_comment_injection`); source `authored_code`. Fewer rows come
    back when the standard library runs out of distinct chunks (about 2,000 from CPython 3.11's), with a
    warning naming guard.code_rows."""
    rng = random.Random(seed)
    files = list(stdlib_files())
    rng.shuffle(files)
    root = stdlib_root()
    out: list[dict] = []
    seen: set[str] = set()
    for path in files:
        if len(out) >= rows:
            break
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) < 10:
            continue
        for _ in range(_CHUNKS_PER_FILE):
            if len(out) >= rows:
                break
            start = rng.randrange(0, len(lines) - 5)
            part = lines[start : start + rng.randint(5, 16)]
            code = "\n".join(part).strip("\n")
            if not 80 <= len(code) <= 1200 or code in seen:
                continue
            seen.add(code)
            attack = len(out) % 2 == 1
            if attack:
                code = "\n".join(_planted(part, rng)).strip("\n")
            question = rng.choice(_QUESTIONS).format(c=code, module=path.relative_to(root).as_posix())
            out.append(
                {
                    "text": question,
                    "label": int(attack),
                    "attack_type": "code_comment_injection" if attack else "benign_code",
                    "source": "authored_code",
                }
            )
    if len(out) < rows:
        from raytune_app import console

        console.logger("guard").warning(
            f"guard.code_rows asks for {rows} rows; this Python's standard library gave {len(out)} distinct chunks "
            f"({root}): training with {len(out)}"
        )
    return out
