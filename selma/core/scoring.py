"""DSG's dependency rule (github.com/j-min/DSG), shared by the benchmarks (:mod:`selma.eval.questions`)
and the shapes world's exact evaluator (:mod:`selma.world.evaluator`)."""

from __future__ import annotations


def score_answers(rows: list[dict]) -> list[dict]:
    """Add ``score`` (with dependencies) to rows that carry ``image_id``, ``question_id``,
    ``parents`` and ``correct``; a question whose parent was answered wrongly scores 0."""
    correct_of = {(r["image_id"], r["question_id"]): r["correct"] for r in rows}
    scored = []
    for row in rows:
        parent_failed = any(correct_of.get((row["image_id"], p), 1.0) == 0 for p in row["parents"] or () if p)
        scored.append({**row, "score": 0.0 if parent_failed else float(row["correct"])})
    return scored
