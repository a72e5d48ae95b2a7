"""One text normalisation for everything that reads a prompt: the guard (training, eval, serving) and the
served model, so the classifier and the LLM always read the same characters.

    normalize("ｉｇｎｏｒｅ\u200b rules")      # 'ignore rules': NFKC, invisible characters removed
    hidden_text("hi" + smuggled)            # the ASCII a run of Unicode tag characters spells, or ''
    lone_surrogate("a\ud800")               # 1: the index of a UTF-16 half no encoder accepts, or -1

What `normalize` does, in order:
1. Unicode NFKC: full-width, styled (mathematical bold, circled...) and compatibility forms become the
   plain characters a tokenizer knows, so "ｉｇｎｏｒｅ" is the word the guard was trained on.
2. Removes characters that render as nothing and that tokenizers treat unevenly (some drop them, some
   byte-encode them): every format character (Unicode category Cf: zero-width space / joiners, bidi
   controls, word joiner, soft hyphen, BOM, and the tag block U+E0000-U+E007F), variation selectors
   (which can carry data, one byte per selector), and control characters other than tab, newline and
   carriage return (NUL...). Splitting "ig\u200bnore" no longer hides the word from the guard.
3. Replaces a lone UTF-16 surrogate (not encodable; `json.loads` lets "\\ud800" through) with U+FFFD.

Serving refuses before normalising what removal would hide: text spelled in tag characters (an
instruction written in invisible ASCII, `hidden_text`) and lone surrogates (a client bug). Pure Python,
no dependencies: imported by raytune_app/serve (ingress) and raytune_app/guard (data, model).
"""

from __future__ import annotations

import re
import unicodedata

# Tag characters U+E0020-U+E007E mirror printable ASCII; U+E0001 (language tag) and U+E007F (cancel tag)
# frame them. Their one legitimate use is the subdivision flags (black flag U+1F3F4, 5-6 tags, cancel tag).
_TAG_RUN = re.compile("[\U000e0000-\U000e007f]+")
_FLAG = re.compile("\U0001f3f4[\U000e0020-\U000e007e]{1,7}\U000e007f")
_SURROGATE = re.compile("[\ud800-\udfff]")
_KEEP_CONTROLS = {"\t", "\n", "\r"}
# Variation selectors: VS1-16 and the supplement VS17-256 (category Mn, so step 2's Cf test misses them).
_VARIATION = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")


def lone_surrogate(text: str) -> int:
    """Index of the first lone surrogate in `text` (a str from JSON can hold one), or -1."""
    found = _SURROGATE.search(text)
    return found.start() if found else -1


def hidden_text(text: str) -> str:
    """The ASCII spelled by runs of Unicode tag characters (invisible when rendered), subdivision flags
    excepted; '' when there is none."""
    if not _TAG_RUN.search(text):
        return ""
    text = _FLAG.sub("", text)
    spelled = []
    for run in _TAG_RUN.findall(text):
        spelled.append("".join(chr(ord(c) - 0xE0000) for c in run if 0xE0020 <= ord(c) <= 0xE007E))
    return " ".join(s for s in spelled if s.strip())


def _visible(char: str) -> bool:
    category = unicodedata.category(char)
    if category == "Cf":
        return False
    return category != "Cc" or char in _KEEP_CONTROLS


def normalize(text: str) -> str:
    """NFKC, invisible characters removed, lone surrogates replaced; idempotent."""
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    text = unicodedata.normalize("NFKC", text)
    text = _VARIATION.sub("", text)
    if text.isascii():  # the common case: only C0 controls and DEL can be invisible in ASCII
        if text.isprintable() or all(c.isprintable() or c in _KEEP_CONTROLS for c in text):
            return text
    cleaned = "".join(c for c in text if _visible(c))
    # Removing a character can join two that NFKC composes (e.g. a base letter and a combining mark).
    return unicodedata.normalize("NFKC", cleaned)
