import random

import pytest
from rouge_score import rouge_scorer

from selma.prompts.diversity import DiversityFilter, rouge_l, tokenize

WORDS = "a the red blue dog cat sits on under mat table two three big small near park bench tree".split()


def _random_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 14))]
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.upper() + rng.choice(["!", ", ok.", " – 3 ", " naïve"])
    return text


def _near_duplicate(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.4 and words:
            words.pop(rng.randrange(len(words)))
        elif op < 0.8:
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        elif words:
            words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)


def test_scores_equal_rouge_score_on_random_and_near_duplicate_pairs():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    for _ in range(3000):
        a = _random_text(rng)
        b = _near_duplicate(rng, a) if rng.random() < 0.6 else _random_text(rng)
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


def test_filter_decisions_equal_the_brute_force_loop():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    pool = [_random_text(rng) for _ in range(3)]
    fast = DiversityFilter(0.8, pool)
    brute = list(pool)
    for _ in range(600):
        base = rng.choice(brute)
        candidate = _near_duplicate(rng, base) if rng.random() < 0.7 else _random_text(rng)
        expected = not any(scorer.score(p, candidate)["rougeL"].fmeasure > 0.8 for p in brute)
        assert fast.offer(candidate) == expected, candidate
        if expected:
            brute.append(candidate)
    assert len(fast) == len(brute)


def test_tokenizer_matches_rouge_score():
    from rouge_score import tokenize as reference

    for text in ["Hello, World!", "naïve café 3x4", "", "  --  ", "A-B_c d'e"]:
        assert tokenize(text) == reference.tokenize(text, None)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 1.0])
def test_identical_prompt_is_rejected_below_threshold_one(threshold):
    f = DiversityFilter(threshold, ["a dog on a mat"])
    assert f.offer("A dog on a mat!") is (threshold == 1.0)
