"""Readability: the checks `nanoseek sample` keeps a completion by, and `nanoseek eval` reports as a rate.

R1 added its supervised stages because R1-Zero's reasoning was hard to read (mixed languages, no
structure). Here "readable" means: the R1 format, a bounded length, no characters outside printable
ASCII (control bytes, replacement characters, another script) and no repeated line (the loops RL
policies fall into).
"""

from __future__ import annotations

import re

from nanoseek.data.tasks import format_ok

_FINAL_ANSWER = re.compile(r"\n\s*Answer:[ \t]*(\S[^\n]*?)\s*$")

_PRINTABLE = set(chr(c) for c in range(32, 127)) | {"\n", "\t"}


def foreign_share(text: str) -> float:
    """Share of characters outside printable ASCII (control bytes, replacement chars, other scripts)."""
    return sum(ch not in _PRINTABLE for ch in text) / max(len(text), 1)


def repeated_line(text: str, min_chars: int = 8) -> str | None:
    """The first non-trivial line (>= min_chars after stripping) that occurs twice, else None."""
    seen = set()
    for line in text.splitlines():
        line = line.strip()
        if len(line) >= min_chars:
            if line in seen:
                return line
            seen.add(line)
    return None


def readability(text: str, max_chars: int = 4000, max_foreign: float = 0.0) -> str | None:
    """Why `text` is unreadable ("format", "length", "garbled", "repeated"), or None when it is fine."""
    if not format_ok(text):
        return "format"
    if len(text) > max_chars:
        return "length"
    if foreign_share(text) > max_foreign:
        return "garbled"
    if repeated_line(text) is not None:
        return "repeated"
    return None


def to_r1_format(text: str) -> str | None:
    """`text` in the R1 template: as it is when it already has the format; reasoning followed by a final
    "Answer: X" line (the plain style) becomes `<think>\\n{reasoning}\\n</think> <answer> X </answer>`;
    anything else (no final answer line, stray tags, no reasoning) gives None. R1's cold-start data
    included R1-Zero outputs post-processed into a readable format; this is that rewrite, for traces
    whose structure is already plain reasoning plus an answer."""
    if format_ok(text):
        return text
    if "<think>" in text or "</think>" in text or "<answer>" in text or "</answer>" in text:
        return None
    match = _FINAL_ANSWER.search(text.rstrip())
    reasoning = text[:match.start()].strip() if match else ""
    if not match or not reasoning:
        return None
    return f"<think>\n{reasoning}\n</think> <answer> {match.group(1)} </answer>"
