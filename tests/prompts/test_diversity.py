import pickle
import random

import pytest
from rouge_score import rouge_scorer, tokenizers
from rouge_score import tokenize as reference_tokenize

from selma.prompts.diversity import DiversityFilter, lcs_length, rouge_l, tokenize

WORDS = "a the red blue dog cat sits on under mat table two three big small near park bench tree".split()
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
NOISE = ["!", ", ok.", " – 3 ", " naïve", "...", " ĺ", "\tx\n", " 🙂 ", "İ", "--"]


def _reference(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def _random_text(rng: random.Random, words=WORDS, max_len: int = 14) -> str:
    words = [rng.choice(words) for _ in range(rng.randint(0, max_len))]
    if words and rng.random() < 0.1:  # repeated words
        i = rng.randrange(len(words))
        words[i:i] = [words[i]] * rng.randint(1, 3)
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.upper() + rng.choice(NOISE)
    if rng.random() < 0.03:
        text = rng.choice(["", " ", "?!", "— … ·", "日本語", "ÀÉÎ"])
    return text


def _near_duplicate(rng: random.Random, text: str, words=WORDS) -> str:
    tokens = text.split()
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.3 and tokens:
            tokens.pop(rng.randrange(len(tokens)))
        elif op < 0.55:
            tokens.insert(rng.randint(0, len(tokens)), rng.choice(words))
        elif op < 0.8 and tokens:
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
        elif len(tokens) > 1:
            i = rng.randrange(len(tokens) - 1)
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    text = " ".join(tokens)
    if rng.random() < 0.3:
        text = rng.choice([str.upper, str.lower, str.title])(text)
    if rng.random() < 0.3:
        text = text.replace(" ", rng.choice([", ", " - ", "  ", "_", " / "]), 1) + rng.choice(NOISE)
    return text


# Exact-0.8 ties (5·LCS == 2·(m+n)): rouge-score's float formula rejects some and accepts others.
TIES_ABOVE = [(5, 5, 4), (10, 10, 8), (15, 15, 12), (13, 17, 12)]  # F == 0.8000000000000002
TIES_EQUAL = [(2, 3, 2), (4, 6, 4), (6, 4, 4), (10, 15, 10), (12, 13, 10)]  # F == 0.8
TIES_BELOW = [(7, 8, 6), (8, 7, 6), (14, 16, 12)]  # F == 0.7999999999999999


def _pair_with_lcs(m: int, n: int, lcs: int) -> tuple[str, str]:
    """Target of m tokens, prediction of n tokens, sharing exactly an in-order run of lcs tokens."""
    common = [f"w{i}" for i in range(lcs)]
    return " ".join(common + [f"t{i}" for i in range(m - lcs)]), " ".join(common + [f"p{i}" for i in range(n - lcs)])


# --------------------------------------------------------------------------- tokenizer and score


def test_tokenizer_matches_rouge_score():
    default = tokenizers.DefaultTokenizer(use_stemmer=False)
    texts = ["Hello, World!", "naïve café 3x4", "", "  --  ", "A-B_c d'e", "İstanbul ıi", "straße ǅemal",
             "１２３ ４５", "ﬁne ﬂow", "ΑΒΓ abc", "tab\tnew\nline\r\n", "\u00a0nbsp\u2003em", "x\u0307y",
             "日本語テキスト", "🙂🙂 ok", "K\u212a", "a.b,c;d:e", "0", "007 bond", "e\u0301t\u00e9"]
    rng = random.Random(3)
    alphabet = "aZ09 _-.,!\t\n\u00e9\u0130\u0131\u00df\u212a\uff11\u00a0\u2003\u0301🙂日"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(2000)]
    for text in texts:
        assert tokenize(text) == reference_tokenize.tokenize(text, None) == default.tokenize(text), repr(text)


def test_lcs_length_matches_rouge_score_table():
    rng = random.Random(4)
    for _ in range(1500):
        alphabet = WORDS[: rng.randint(1, len(WORDS))]
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 90))]  # > 64 tokens: multi-word bit masks
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 90))]
        expected = rouge_scorer._lcs_table(a, b)[-1][-1]
        assert lcs_length(a, b) == lcs_length(b, a) == expected


def test_scores_equal_rouge_score_on_random_and_near_duplicate_pairs():
    rng = random.Random(0)
    for _ in range(4000):
        a = _random_text(rng)
        b = _near_duplicate(rng, a) if rng.random() < 0.6 else _random_text(rng)
        assert rouge_l(a, b) == _reference(a, b), (a, b)
        assert rouge_l(b, a) == _reference(b, a), (a, b)


def test_exact_ties_at_threshold_follow_rouge_score_floats():
    for cases, expected in ((TIES_ABOVE, True), (TIES_EQUAL, False), (TIES_BELOW, False)):
        for m, n, lcs in cases:
            assert 5 * lcs == 2 * (m + n)
            target, prediction = _pair_with_lcs(m, n, lcs)
            score = _reference(target, prediction)
            assert rouge_l(target, prediction) == score
            assert (score > 0.8) is expected, (m, n, lcs, score)
            assert DiversityFilter(0.8, [target]).too_similar(prediction) is expected, (m, n, lcs)
            assert DiversityFilter(0.8, ["x y z", target, "q"]).offer(prediction) is not expected


# --------------------------------------------------------------------------- filter decisions


def _naive_too_similar(pool: list[str], candidate: str, threshold: float) -> bool:
    return any(_reference(other, candidate) > threshold for other in pool)


def _tie_candidate(rng: random.Random, source: str, counter: list[int]) -> str:
    """An edit of ``source`` whose LCS with it sits exactly on a 0.8 tie (fresh tokens never match)."""
    tokens = tokenize(source)
    m = len(tokens)

    def fresh() -> str:
        counter[0] += 1
        return f"fresh{counter[0]}"

    if m % 5 == 0 and rng.random() < 0.6:  # (m, m, 0.8m): rejected
        for i in rng.sample(range(m), m // 5):
            tokens[i] = fresh()
    elif m % 2 == 0 and rng.random() < 0.5:  # (m, 1.5m, m): F == 0.8, accepted
        for _ in range(m // 2):
            tokens.insert(rng.randint(0, len(tokens)), fresh())
    elif m % 3 == 0:  # (m, 2m/3, 2m/3): F == 0.8, accepted
        for _ in range(m // 3):
            tokens.pop(rng.randrange(len(tokens)))
    elif m in (7, 8):  # (7, 8, 6) / (8, 7, 6): F < 0.8, accepted
        tokens[rng.randrange(m)] = fresh()
        if m == 7:
            tokens.insert(rng.randint(0, m), fresh())
        else:
            tokens.pop(rng.randrange(m))
    return " ".join(tokens)


def _run_sequence(rng: random.Random, threshold: float, steps: int, words=WORDS, pool_size: int = 3):
    pool = [_random_text(rng, words) for _ in range(pool_size)]
    fast = DiversityFilter(threshold, pool)
    brute = list(pool)
    decisions = []
    ties = {True: 0, False: 0}  # tie candidates (5·LCS == 2·(m+n) with their source) by decision
    counter = [0]
    for _ in range(steps):
        r = rng.random()
        base = rng.choice(brute)
        if r < 0.5:
            candidate = _near_duplicate(rng, base, words)
        elif r < 0.65:
            candidate = _tie_candidate(rng, base, counter)
        else:
            candidate = _random_text(rng, words)
        expected = not _naive_too_similar(brute, candidate, threshold)
        assert fast.offer(candidate) is expected, (threshold, candidate)
        decisions.append(expected)
        a, b = tokenize(base), tokenize(candidate)
        if a and b and 5 * lcs_length(a, b) == 2 * (len(a) + len(b)):
            ties[expected] += 1
        if expected:
            brute.append(candidate)
    assert len(fast) == len(brute) and fast.texts == brute
    return decisions, ties


def test_filter_decisions_equal_the_naive_rouge_score_loop():
    """~2,400 candidates through 6 independent pools, every decision checked against rouge-score."""
    rng = random.Random(1)
    vocabularies = [WORDS, WORDS[:8], WORDS + [f"v{i}" for i in range(40)]]
    decisions, ties = [], {True: 0, False: 0}
    for skill in range(6):
        more, more_ties = _run_sequence(rng, 0.8, 400, vocabularies[skill % 3])
        decisions += more
        ties = {k: ties[k] + more_ties[k] for k in ties}
    accepted = sum(decisions)
    # Both outcomes must be common, or agreement proves little; exact 0.8 ties both ways too.
    assert 0.25 * len(decisions) < accepted < 0.75 * len(decisions), accepted
    assert ties[True] >= 30 and ties[False] >= 30, ties


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0, -0.1])
def test_filter_decisions_at_other_thresholds(threshold):
    _run_sequence(random.Random(int(threshold * 10) + 20), threshold, 150)


def test_larger_pool_against_bounded_rouge_score_loop():
    """One pool grown to ~1,500 prompts (rarity order keeps changing): every decision equals the loop
    over every pool prompt that skips only pairs whose token-multiset overlap (an upper bound on the
    LCS) cannot exceed the threshold, scoring the rest with rouge-score itself."""
    from collections import Counter

    rng = random.Random(7)
    words = [f"w{i}" for i in range(120)] + ["a", "the", "of", "on"] * 10
    fast = DiversityFilter(0.8)
    pool: list[tuple[list[str], Counter]] = []
    accepted = rejected = 0
    for step in range(2500):
        if pool and rng.random() < 0.45:
            source = " ".join(rng.choice(pool)[0])
            candidate = _tie_candidate(rng, source, [step * 100]) if rng.random() < 0.3 else (
                _near_duplicate(rng, source, words))
        else:
            candidate = _random_text(rng, words, max_len=25)
        tokens = reference_tokenize.tokenize(candidate, None)
        counts = Counter(tokens)
        n = len(tokens)
        expected = True
        for other, other_counts in pool:
            overlap = sum((counts & other_counts).values())
            if 5 * overlap < 2 * (len(other) + n):
                continue  # 2·overlap/(m+n) < 0.8 in exact integers, and LCS <= overlap
            if rouge_scorer._score_lcs(other, tokens).fmeasure > 0.8:
                expected = False
                break
        assert fast.offer(candidate) is expected, candidate
        if expected:
            pool.append((tokens, counts))
            accepted += 1
        else:
            rejected += 1
    assert accepted > 1000 and rejected > 500, (accepted, rejected)


def test_pickle_state_and_offer_many():
    rng = random.Random(5)
    texts = [_random_text(rng) for _ in range(300)]
    f = DiversityFilter(0.8, ["a dog on a mat"])
    first = f.offer_many(texts[:200])
    copy = pickle.loads(pickle.dumps(f))
    restored = DiversityFilter.from_state(f.state())
    assert copy.texts == restored.texts == f.texts and len(copy) == len(f)
    rest = f.offer_many(texts[200:])
    assert copy.offer_many(texts[200:]) == rest == [restored.offer(t) for t in texts[200:]]
    sequential = DiversityFilter(0.8, ["a dog on a mat"])
    assert [sequential.offer(t) for t in texts] == first + rest
    assert True in first and False in first


@pytest.mark.parametrize("threshold", [0.5, 0.8, 1.0])
def test_identical_prompt_is_rejected_below_threshold_one(threshold):
    f = DiversityFilter(threshold, ["a dog on a mat"])
    assert f.offer("A dog on a mat!") is (threshold == 1.0)


def test_empty_candidates_and_pool_prompts_never_match():
    f = DiversityFilter(0.8, ["", "?!", "a dog"])
    assert len(f) == 3
    assert f.offer("") and f.offer("...") and f.offer("a cat")
    assert not f.offer("A dog.")
