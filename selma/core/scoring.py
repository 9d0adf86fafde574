"""DSG's dependency rule (github.com/j-min/DSG), shared by the benchmarks (:mod:`selma.eval.questions`)
and the shapes world's exact evaluator (:mod:`selma.world.evaluator`); and the mean ± standard error
over prompts that the world's reports give."""

from __future__ import annotations

import math


def score_answers(rows: list[dict]) -> list[dict]:
    """Add ``score`` (with dependencies) to rows that carry ``image_id``, ``question_id``,
    ``parents`` and ``correct``; a question whose parent was answered wrongly scores 0."""
    correct_of = {(r["image_id"], r["question_id"]): r["correct"] for r in rows}
    scored = []
    for row in rows:
        parent_failed = any(correct_of.get((row["image_id"], p), 1.0) == 0 for p in row["parents"] or () if p)
        scored.append({**row, "score": 0.0 if parent_failed else float(row["correct"])})
    return scored


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` (one per prompt) and its standard error (sample s.d. / √n; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(variance / n)
