"""The SELMA diversity filter: reject a prompt whose ROUGE-L F-measure with any earlier one is > 0.8.

Scores match the ``rouge-score`` package (``RougeScorer(["rougeL"], use_stemmer=False)``)
exactly: same tokenisation, same LCS, same floating-point formula.
"""

from __future__ import annotations

import re
from collections import Counter

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lowercase, non-[a-z0-9] runs split tokens."""
    return [token for token in _NON_ALPHANUMERIC.sub(" ", text.lower()).split() if token]


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _fmeasure_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(target: str | list[str], prediction: str | list[str]) -> float:
    """ROUGE-L F-measure, identical to ``rouge_score`` without stemming."""
    t = tokenize(target) if isinstance(target, str) else target
    p = tokenize(prediction) if isinstance(prediction, str) else prediction
    if not t or not p:
        return 0.0
    return _fmeasure_from_lcs(lcs_length(t, p), len(t), len(p))


class DiversityFilter:
    """Holds one skill's pool; ``offer`` accepts a candidate unless it is too close to the pool.

    Exact: the LCS is computed only for pool prompts whose length and shared-token counts could
    still reach the threshold (both are upper bounds on the LCS), so the decisions equal the
    brute-force loop over every pool prompt.
    """

    def __init__(self, threshold: float = 0.8, pool: list[str] = ()):
        self.threshold = threshold
        self._pool: list[tuple[list[str], Counter]] = []
        for text in pool:
            self._add(tokenize(text))

    def __len__(self) -> int:
        return len(self._pool)

    def _add(self, tokens: list[str]) -> None:
        self._pool.append((tokens, Counter(tokens)))

    def too_similar(self, text: str) -> bool:
        tokens = tokenize(text)
        if not tokens:
            return False
        counts = Counter(tokens)
        n = len(tokens)
        for other, other_counts in self._pool:
            m = len(other)
            if not m or _fmeasure_from_lcs(min(m, n), m, n) <= self.threshold:
                continue
            overlap = sum((counts & other_counts).values())
            if _fmeasure_from_lcs(overlap, m, n) <= self.threshold:
                continue
            if _fmeasure_from_lcs(lcs_length(other, tokens), m, n) > self.threshold:
                return True
        return False

    def offer(self, text: str) -> bool:
        """Accept ``text`` into the pool if it is diverse enough; return whether it was accepted."""
        if self.too_similar(text):
            return False
        self._add(tokenize(text))
        return True
