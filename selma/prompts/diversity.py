"""The SELMA diversity filter: reject a prompt whose ROUGE-L F-measure with any earlier one is > 0.8.

Scores match the ``rouge-score`` package (``RougeScorer(["rougeL"], use_stemmer=False)``)
exactly: same tokenisation, same LCS, same floating-point formula.

``DiversityFilter`` decides exactly as the brute-force loop "reject if any pool prompt scores
above the threshold", but looks at only a handful of pool prompts per candidate:

* A prompt is a multiset of tokens; the k-th occurrence of a token is the *element*
  ``(token, k)``, so the multiset overlap of two prompts is the size of the intersection of their
  element sets, and the LCS is at most that overlap.
* For a candidate of n tokens and a pool prompt of m tokens, ``need[m]`` is the smallest LCS
  whose F-measure (rouge-score's own float formula) exceeds the threshold, found by scanning
  every possible LCS value, so the pruning below never depends on rounding behaviour (ties at
  exactly 0.8 decide as rouge-score decides). Lengths with no such value are skipped outright.
* Prefix filter: order the candidate's n elements by how many pool prompts hold them (rarest
  first; elements no pool prompt holds come first). A pool prompt sharing at least ``need[m]``
  elements with the candidate must hold one of the first ``n - need[m] + 1`` of them. The
  inverted index lists every element of every pool prompt, so this holds for whatever order
  the rarities give at query time; only the candidate's rare elements are ever probed, and the
  postings of "a", "the", "of" are never read.
* For the pool prompts found, the exact overlap is counted with numpy (a CSR array of every
  pool prompt's elements); those reaching ``need[m]`` get the exact LCS (bit-parallel) and the
  rouge-score F-measure.
"""

from __future__ import annotations

import re

import numpy as np

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lowercase, non-[a-z0-9] runs split tokens."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (bit-parallel; Allison–Dix / Hyyrö)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    bit = 1
    for token in a:
        masks[token] = masks.get(token, 0) | bit
        bit <<= 1
    full = bit - 1
    v = full
    get = masks.get
    for token in b:
        match = get(token)
        if match:
            u = v & match
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _fmeasure_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_score.rouge_scorer._score_lcs + scoring.fmeasure, operation for operation."""
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


class _IntArray:
    """An append-only numpy integer array (amortised doubling)."""

    __slots__ = ("data", "size")

    def __init__(self, dtype=np.int32, capacity: int = 4):
        self.data = np.empty(capacity, dtype=dtype)
        self.size = 0

    def _reserve(self, needed: int) -> None:
        if needed > len(self.data):
            grown = np.empty(max(needed, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self._reserve(self.size + 1)
        self.data[self.size] = value
        self.size += 1

    def extend(self, values: list[int]) -> None:
        end = self.size + len(values)
        self._reserve(end)
        self.data[self.size:end] = values
        self.size = end

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class DiversityFilter:
    """Holds one skill's pool; ``offer`` accepts a candidate unless it is too close to the pool.

    Exact: decisions equal the brute-force loop ``any(rouge_l(p, text) > threshold for p in pool)``
    (see the module docstring for how the few pool prompts worth an LCS are found). Picklable:
    the state is the threshold and the pool texts; the index is rebuilt on unpickling.
    """

    def __init__(self, threshold: float = 0.8, pool: list[str] = ()):
        self.threshold = threshold
        self._texts: list[str] = []
        self._tokens: list[list[str]] = []  # indexed pool prompts (non-empty), by pool id
        self._element_ids: dict[tuple[str, int], int] = {}
        self._postings: list[_IntArray] = []  # element id -> pool ids holding it
        self._lengths = _IntArray(np.int32)  # pool id -> token count
        self._starts = _IntArray(np.int64)  # pool id -> offset into _elements (CSR)
        self._starts.append(0)
        self._elements = _IntArray(np.int32)
        self._length_counts = np.zeros(1, dtype=np.int64)  # token count -> pool prompts
        self._mark = np.zeros(0, dtype=bool)
        self._need_cache: dict[int, np.ndarray] = {}
        for text in pool:
            self._add(text, tokenize(text))

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def texts(self) -> list[str]:
        """The pool, in the order it was built (initial pool, then accepted prompts)."""
        return list(self._texts)

    def state(self) -> dict:
        return {"threshold": self.threshold, "texts": list(self._texts)}

    @classmethod
    def from_state(cls, state: dict) -> "DiversityFilter":
        return cls(state["threshold"], state["texts"])

    def __getstate__(self) -> dict:
        return self.state()

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["threshold"], state["texts"])

    def too_similar(self, text: str) -> bool:
        return self._too_similar(tokenize(text))

    def offer(self, text: str) -> bool:
        """Accept ``text`` into the pool if it is diverse enough; return whether it was accepted."""
        tokens = tokenize(text)
        if self._too_similar(tokens):
            return False
        self._add(text, tokens)
        return True

    def offer_many(self, texts) -> list[bool]:
        """``offer`` each text in turn (each accepted one already counts against the next)."""
        return [self.offer(text) for text in texts]

    # ------------------------------------------------------------------ index

    def _add(self, text: str, tokens: list[str]) -> None:
        self._texts.append(text)
        if not tokens:
            return
        pool_id = len(self._tokens)
        self._tokens.append(tokens)
        element_ids = self._element_ids
        postings = self._postings
        seen: dict[str, int] = {}
        elements = []
        for token in tokens:
            k = seen.get(token, 0)
            seen[token] = k + 1
            element = element_ids.get((token, k))
            if element is None:
                element = element_ids[(token, k)] = len(postings)
                postings.append(_IntArray(np.int32))
            postings[element].append(pool_id)
            elements.append(element)
        self._elements.extend(elements)
        self._starts.append(self._elements.size)
        self._lengths.append(len(tokens))
        m = len(tokens)
        if m >= len(self._length_counts):
            grown = np.zeros(max(m + 1, 2 * len(self._length_counts)), dtype=np.int64)
            grown[: len(self._length_counts)] = self._length_counts
            self._length_counts = grown
            self._need_cache.clear()
        self._length_counts[m] += 1

    def _need(self, n: int) -> np.ndarray:
        """need[m]: the least LCS whose F-measure (rouge-score's float formula) is > threshold, for
        a candidate of n tokens against m; ``n + 1`` (never reached) where no LCS value does."""
        need = self._need_cache.get((n, self.threshold))
        if need is None:
            threshold = self.threshold
            need = np.full(len(self._length_counts), n + 1, dtype=np.int64)
            for m in range(1, len(need)):
                for lcs in range(1, min(m, n) + 1):  # every value: no monotonicity assumed
                    if _fmeasure_from_lcs(lcs, m, n) > threshold:
                        need[m] = lcs
                        break
            self._need_cache[(n, self.threshold)] = need
        return need

    # ------------------------------------------------------------------ query

    def _too_similar(self, tokens: list[str]) -> bool:
        threshold = self.threshold
        if not threshold >= 0:  # negative: every pair's 0.0 already exceeds it
            return bool(self._texts) if threshold < 0 else False
        n = len(tokens)
        if not n or not self._tokens:
            return False
        need = self._need(n)
        present = self._length_counts > 0
        admissible = need[present]
        min_need = int(admissible.min())
        if min_need > n:
            return False
        prefix = n - min_need + 1  # the candidate elements worth probing, rarest first

        element_ids = self._element_ids
        postings = self._postings
        seen: dict[str, int] = {}
        known = []
        for token in tokens:
            k = seen.get(token, 0)
            seen[token] = k + 1
            element = element_ids.get((token, k))
            if element is not None:
                known.append(element)
        unknown = n - len(known)  # held by no pool prompt: the rarest, and never shared
        if unknown >= prefix:
            return False
        known.sort(key=lambda e: postings[e].size)

        # Probe the prefix; a pool prompt of length m counts only if it turned up within the
        # first n - need[m] + 1 positions of the candidate's rarity order.
        probes = known[: prefix - unknown]
        lists = [postings[e].view() for e in probes]
        positions = np.repeat(np.arange(unknown, unknown + len(probes)), [len(a) for a in lists])
        found = np.concatenate(lists)
        ids, first = np.unique(found, return_index=True)  # first hit = earliest position
        lengths = self._lengths.view()[ids]
        need_ids = need[lengths]
        keep = positions[first] <= n - need_ids
        if not keep.any():
            return False
        ids, lengths, need_ids = ids[keep], lengths[keep], need_ids[keep]

        # Exact multiset overlap (an upper bound on the LCS) for the pool prompts found.
        if len(self._mark) < len(postings):
            self._mark = np.zeros(max(len(postings), 2 * len(self._mark)), dtype=bool)
        mark = self._mark
        mark[known] = True
        starts = self._starts.view()[ids]
        offsets = np.cumsum(lengths) - lengths
        gather = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
        hits = mark[self._elements.view()[gather]].astype(np.int32)
        mark[known] = False
        overlap = np.add.reduceat(hits, offsets)
        keep = overlap >= need_ids
        if not keep.any():
            return False
        ids, overlap = ids[keep], overlap[keep]

        pool_tokens = self._tokens
        for pool_id in ids[np.argsort(-overlap, kind="stable")].tolist():
            other = pool_tokens[pool_id]
            if _fmeasure_from_lcs(lcs_length(other, tokens), len(other), n) > threshold:
                return True
        return False
