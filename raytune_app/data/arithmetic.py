"""Multi-step arithmetic word problems with integer answers, and the program that solves them.

    rows = generate(500, seed=0)      # [{"id", "question", "answer"}], answer a string of digits
    text = solve("Mia has 12 shells. She finds 5 more. ...")   # a worked rationale + "So the answer is 34."

A task with a verifiable label for Distilling Step-by-Step on CPU: the `solve` program is the teacher
(`distill.teacher: {backend: program, program: arithmetic}`), writing the rationale a careful teacher
model would, step by step. Problems chain 2-4 operations (add, take away, multiply, share evenly), so
the answer needs intermediate results the rationale spells out. No Ray here.
"""

from __future__ import annotations

import random
import re

NAMES = ["Mia", "Tom", "Ana", "Raj", "Lena", "Omar", "Yuki", "Sam", "Ivy", "Noah"]
ITEMS = ["shells", "stickers", "apples", "coins", "marbles", "books", "stamps", "cards"]
# (sentence template, operation); {n} is the operand. Each template is matched back by `solve`.
STEPS = [
    ("{who} finds {n} more.", "+"),
    ("{who} buys {n} more.", "+"),
    ("A friend gives {who} {n} more.", "+"),
    ("{who} gives away {n}.", "-"),
    ("{who} loses {n}.", "-"),
    ("{who} sells {n}.", "-"),
    ("{who} ends up with {n} times as many.", "*"),
    ("{who} shares them equally among {n} friends and keeps one share.", "/"),
]
PATTERNS = [
    (re.compile("^" + re.escape(t).replace(re.escape("{who}"), r"\w+").replace(re.escape("{n}"), r"(\d+)") + "$"), op)
    for t, op in STEPS
]
VERBS = {
    "+": "adding {n} gives {a} + {n} = {r}",
    "-": "taking away {n} leaves {a} - {n} = {r}",
    "*": "{n} times as many is {a} x {n} = {r}",
    "/": "one of {n} equal shares is {a} / {n} = {r}",
}


def _problem(rng: random.Random) -> tuple[str, int]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(5, 40)
    sentences = [f"{who} has {value} {item}."]
    for _ in range(rng.randint(2, 4)):
        template, op = rng.choice(STEPS)
        if op == "+":
            n = rng.randint(2, 30)
            value += n
        elif op == "-":
            if value < 3:
                continue
            n = rng.randint(1, value - 1)
            value -= n
        elif op == "*":
            if value > 60:
                continue
            n = rng.randint(2, 4)
            value *= n
        else:
            divisors = [d for d in range(2, 7) if value % d == 0 and value // d >= 2]
            if not divisors:
                continue
            n = rng.choice(divisors)
            value //= n
        sentences.append(template.format(who=who, n=n))
    sentences.append(f"How many {item} does {who} have now?")
    return " ".join(sentences), value


def generate(rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < rows:
        question, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"id": f"arith-{seed}-{len(out)}", "question": question, "answer": str(answer)})
    return out


def solve(question: str) -> str:
    """The worked solution of a generated problem, ending with "So the answer is N."; raises ValueError
    for text it does not recognise."""
    sentences = re.split(r"(?<=[.?])\s+", question.strip())
    start = re.match(r"^(\w+) has (\d+) (\w+)\.$", sentences[0]) if sentences else None
    if not start or not sentences[-1].startswith("How many"):
        raise ValueError("not a multi-step arithmetic problem")
    who, value, item = start.group(1), int(start.group(2)), start.group(3)
    lines = [f"{who} starts with {value} {item}."]
    for sentence in sentences[1:-1]:
        for pattern, op in PATTERNS:
            found = pattern.match(sentence)
            if found:
                n = int(found.group(1))
                result = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
                lines.append(VERBS[op].format(n=n, a=value, r=result).capitalize() + ".")
                value = result
                break
        else:
            raise ValueError(f"unrecognised step: {sentence!r}")
    return " ".join(lines) + f" So the answer is {value}."
