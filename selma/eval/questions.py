"""Benchmark questions in one table, answers mapped to choices, and the scores built from them.

Every benchmark becomes a *question table* (:data:`QUESTION_SCHEMA`): one row per question of a
prompt, with its choices, the correct answer and the ids of the questions it depends on. DSG's
questions are yes/no with a dependency graph; TIFA's are multiple choice without one.

Scores follow the references:

- an answer is *correct* when the VQA answer, mapped to the nearest choice, is the correct one;
- DSG (github.com/j-min/DSG): a question scores 0 when any of its parents was answered wrongly
  ("no"); parents are judged on their own answers, so a zeroed parent does not zero its children;
- an image's score is the mean of its questions' scores, an item's the mean of its images', and
  the benchmark's *item mean* the mean over items; the *question mean* is the micro-average.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from selma.core.scoring import score_answers  # noqa: F401 (re-exported: DSG's rule lives in core, selma.world uses it too)

QUESTION_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("prompt", pa.string()),
    ("source", pa.string()),
    ("question_id", pa.int32()),
    ("question", pa.string()),
    ("choices", pa.list_(pa.string())),
    ("answer", pa.string()),
    ("parents", pa.list_(pa.int32())),
    ("category_broad", pa.string()),
    ("category_detailed", pa.string()),
])
YES_NO = ["yes", "no"]
_PUNCTUATION = re.compile(r"[^\w\s]")


def question_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)


def sample_items(questions: pa.Table, limit: int | None, seed: int) -> pa.Table:
    """The questions of a seeded random sample of ``limit`` items (all when ``limit`` is None)."""
    items = sorted(set(questions.column("item_id").to_pylist()))
    if limit is None or limit >= len(items):
        return questions
    chosen = random.Random(seed).sample(items, limit)
    return questions.filter(pc.is_in(questions.column("item_id"), pa.array(chosen, pa.string())))


def prompts_of(questions: pa.Table) -> list[dict]:
    """One ``{item_id, prompt, source}`` per item, in first-seen order."""
    seen: dict[str, dict] = {}
    for row in questions.select(["item_id", "prompt", "source"]).to_pylist():
        seen.setdefault(row["item_id"], row)
    return list(seen.values())


def normalize_answer(text: str | None) -> str:
    return " ".join(_PUNCTUATION.sub(" ", (text or "").lower()).split())


def match_choice(answer: str | None, choices: list[str]) -> str | None:
    """The choice an answer names without needing an encoder: an exact (normalised) match, or a
    yes/no answer that starts with "yes"/"no" ("Yes, it is." → "yes"); None otherwise."""
    normalized = normalize_answer(answer)
    by_text = {normalize_answer(c): c for c in choices}
    if normalized in by_text:
        return by_text[normalized]
    first = normalized.split(" ", 1)[0] if normalized else ""
    if first in ("yes", "no") and first in by_text:
        return by_text[first]
    return None


def is_yes_no(choices: list[str]) -> bool:
    return sorted(normalize_answer(c) for c in choices) == ["no", "yes"]


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _item_mean(rows: list[dict], column: str) -> float | None:
    """Mean over items of the mean over their images of each image's mean question score."""
    per_image: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        per_image[(row["item_id"], row["image_id"])].append(row[column])
    per_item: dict[str, list[float]] = defaultdict(list)
    for (item, _), scores in per_image.items():
        per_item[item].append(_mean(scores))
    return _mean(_mean(scores) for scores in per_item.values())


def _scores(rows: list[dict], *, dependencies: bool) -> dict:
    summary = {"item_mean": _item_mean(rows, "score"), "question_mean": _mean(r["score"] for r in rows),
               "items": len({r["item_id"] for r in rows}), "questions": len(rows)}
    if dependencies:
        summary["item_mean_no_dependencies"] = _item_mean(rows, "correct")
        summary["question_mean_no_dependencies"] = _mean(r["correct"] for r in rows)
    return summary


def summarize(rows: list[dict]) -> dict:
    """Overall, per broad and detailed category, and per source; with and without dependencies
    when any question has parents."""
    dependencies = any(p for r in rows for p in (r["parents"] or ()))
    summary = {"overall": _scores(rows, dependencies=dependencies)}
    for key in ("category_broad", "category_detailed", "source"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[row[key] or "-"].append(row)
        summary[f"per_{key}"] = {name: _scores(group, dependencies=dependencies) for name, group in sorted(groups.items())}
    return summary
