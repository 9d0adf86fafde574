"""Turn a raw LLM completion into candidate prompts, robust to what real models write."""

from __future__ import annotations

import re

NUMBERED = re.compile(r"^\s*(?:\(?\d{1,3}[\.\):]|[-*•])\s+(.*\S)\s*$")
QUOTES = "\"'“”‘’`"
MIN_WORDS = 3


def _clean(text: str) -> str:
    text = "".join(c for c in text if c.isprintable() or c.isspace())
    text = re.sub(r"\s+", " ", text).strip()
    while len(text) > 1 and text[0] in QUOTES and text[-1] in QUOTES:
        text = text[1:-1].strip()
    return text.strip(QUOTES + " ") if text.count('"') == 1 else text


def parse_completion(completion: str, *, truncated: bool = False, answer: bool = False) -> tuple[list[str], int]:
    """Candidates from a numbered-list continuation, and how many lines could not be used.

    The request ends with ``N.``, so the first line of the completion is item N without its
    number. Later items carry numbers (``5.``, ``5)``, ``(5)``) or bullets (``-``, ``*``).
    Preambles ("Here are 20 more…"), blank lines, repeats and a last line cut off by the token
    limit (``truncated``) are dropped. ``answer``: a chat model's reply, where only numbered or
    bulleted lines are items (its first line is no continuation, and closing remarks are dropped).
    Markdown bold (``**4.** text``) is ignored.
    """
    lines = completion.replace("\r", "").replace("**", "").split("\n")
    candidates: list[str] = []
    unparseable = 0
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        match = NUMBERED.match(line)
        if match:
            text = match.group(1)
        elif index == 0 and not answer and not _is_preamble(line):
            text = line
        else:
            unparseable += 1
            continue
        text = _clean(text)
        if sum(any(c.isalpha() for c in word) for word in text.split()) < MIN_WORDS:
            unparseable += 1
            continue
        candidates.append(text)
    if truncated and candidates:
        candidates.pop()
        unparseable += 1
    seen: set[str] = set()
    unique = []
    for text in candidates:
        key = text.lower()
        if key not in seen:
            seen.add(key)
            unique.append(text)
    return unique, unparseable


def _is_preamble(line: str) -> bool:
    stripped = line.strip().lower()
    return stripped.endswith(":") or stripped.startswith(("here are", "here is", "sure", "certainly"))
