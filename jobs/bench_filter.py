"""Benchmark the ROUGE-L diversity filter: selma's indexed ``DiversityFilter`` vs. the naive loop.

For each pool size (accepted prompts in ONE skill): build the pool with ``DiversityFilter.offer``
from a seeded stream of COCO-caption-like prompts (with near-duplicates, so rejections happen),
then decide the same K held-out candidates against that pool with the filter and with the naive
loop (rouge-score's scorer against every pool prompt, stopping at the first score > threshold),
and check that every decision agrees. Prints one JSON object.

    python jobs/bench_filter.py --sizes 2000,10000,50000 --candidates 24 --seed 0
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from rouge_score import rouge_scorer

from selma.prompts.diversity import DiversityFilter

DETERMINERS = "a the one a the two three some several many four five".split()
COLORS = ("red blue green yellow black white brown gray orange pink purple golden silver dark bright pale "
          "striped spotted colorful muddy").split()
SIZES = "small large big tiny huge tall short long little giant wide narrow".split()
MATERIALS = "wooden metal plastic glass stone brick leather paper ceramic woven rusty shiny old new".split()
ANIMALS = ("dog cat horse cow sheep bird elephant giraffe zebra bear duck goat pigeon parrot rabbit "
           "squirrel deer fox owl puppy kitten lamb").split()
PEOPLE = ("man woman boy girl child person skier surfer player chef baker doctor tourist couple "
          "family crowd group teenager farmer police officer rider").split()
OBJECTS = ("bench table chair bicycle motorcycle car bus truck train boat kite umbrella frisbee "
           "skateboard surfboard laptop phone book clock vase bowl cup plate pizza sandwich cake "
           "banana apple orange bottle bag suitcase hat ball bed couch lamp sign pole fence door "
           "window mirror basket box bucket ladder tent flag guitar camera teddy bear kettle oven sink "
           "toilet fridge microwave keyboard mouse remote scissors toothbrush hydrant meter "
           "donut carrot broccoli hotdog wine glass knife fork spoon backpack tie skis racket").split()
PLACES = ("street park beach field kitchen room road sidewalk lake river city mountain forest "
          "snow grass water station market bridge garden yard office restaurant airport farm "
          "harbor desert hill shore alley plaza bakery library stadium court meadow pier "
          "parking lot bathroom bedroom porch village valley canyon").split()
VERBS = ("sitting standing walking running lying riding holding eating playing looking carrying "
         "jumping flying parked waiting sleeping watching crossing pulling pushing throwing "
         "catching resting leaning hanging floating climbing swimming driving cooking "
         "reading painting kicking chasing grazing drinking posing smiling").split()
PREPOSITIONS = "on in near under beside behind above next to across along inside outside over by".split()
TIMES = "at night during the day at sunset in the morning in the rain on a cloudy day in winter".split()


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    for pool, p in ((SIZES, 0.3), (COLORS, 0.45), (MATERIALS, 0.2)):
        if rng.random() < p:
            words.append(rng.choice(pool))
    words.append(rng.choice(rng.choice((ANIMALS, PEOPLE, OBJECTS, OBJECTS))))
    return words


def random_prompt(rng: random.Random) -> str:
    """A COCO-caption-like prompt, 6-25 tokens."""
    while True:
        words = _noun_phrase(rng) + [rng.choice(VERBS)]
        words += [rng.choice(PREPOSITIONS)] + _noun_phrase(rng)
        if rng.random() < 0.5:
            words += ["in", "the", rng.choice(PLACES)]
        if rng.random() < 0.35:
            words += ["with"] + _noun_phrase(rng)
        if rng.random() < 0.25:
            words += ["while"] + _noun_phrase(rng) + [rng.choice(VERBS)]
        if rng.random() < 0.2:
            words += rng.choice(["at night", "during the day", "at sunset", "in the morning",
                                 "in the rain", "on a cloudy day", "in winter"]).split()
        if 6 <= len(words) <= 25:
            text = " ".join(words)
            return text[0].upper() + text[1:] + ("." if rng.random() < 0.5 else "")


VOCABULARY = sorted(set(DETERMINERS + COLORS + SIZES + MATERIALS + ANIMALS + PEOPLE + OBJECTS + PLACES
                        + VERBS + PREPOSITIONS + TIMES + ["in", "the", "with", "while"]))


def near_duplicate(rng: random.Random, text: str) -> str:
    """1-3 word edits (substitute, insert, delete, swap) plus case/punctuation noise."""
    words = text.rstrip(".").split()
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        i = rng.randrange(len(words))
        if op < 0.35:
            words[i] = rng.choice(VOCABULARY)
        elif op < 0.6:
            words.insert(i, rng.choice(VOCABULARY))
        elif op < 0.85 and len(words) > 2:
            words.pop(i)
        elif i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
    text = " ".join(words)
    if rng.random() < 0.2:
        text = text.lower() + rng.choice(["!", ",", " ...", ""])
    return text


def stream(rng: random.Random, recent: list[str], duplicate_rate: float = 0.35):
    while True:
        if recent and rng.random() < duplicate_rate:
            yield near_duplicate(rng, rng.choice(recent))
        else:
            yield random_prompt(rng)


def build(size: int, seed: int) -> tuple[DiversityFilter, dict]:
    rng = random.Random(seed)
    f = DiversityFilter(0.8)
    accepted: list[str] = []
    decisions = 0
    start = time.perf_counter()
    for text in stream(rng, accepted):
        decisions += 1
        if f.offer(text):
            accepted.append(text)
            if len(accepted) >= size:
                break
    seconds = time.perf_counter() - start
    return f, {"build_s": round(seconds, 3), "build_decisions": decisions,
               "build_rejected": decisions - size, "build_decisions_per_s": round(decisions / seconds, 1)}


def naive_too_similar(scorer, pool: list[str], candidate: str, threshold: float) -> bool:
    for other in pool:
        if scorer.score(other, candidate)["rougeL"].fmeasure > threshold:
            return True
    return False


def held_out(rng: random.Random, pool: list[str], k: int) -> list[str]:
    """Half near-duplicates of pool prompts (mostly rejected), half fresh prompts (mostly accepted)."""
    return [near_duplicate(rng, rng.choice(pool)) if i % 2 else random_prompt(rng) for i in range(k)]


def bench_size(size: int, k: int, seed: int, min_fast_s: float = 0.5) -> dict:
    f, row = build(size, seed)
    pool = f.texts
    candidates = held_out(random.Random(seed + 1), pool, k)

    fast, repeats, start = None, 0, time.perf_counter()
    while True:
        decisions = [f.too_similar(c) for c in candidates]
        fast = fast or decisions
        repeats += 1
        fast_s = time.perf_counter() - start
        if fast_s >= min_fast_s:
            break
    fast_per_s = repeats * k / fast_s

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    naive = [naive_too_similar(scorer, pool, c, f.threshold) for c in candidates]
    naive_s = time.perf_counter() - start
    naive_per_s = k / naive_s

    row.update({
        "pool": len(f), "candidates": k, "candidates_rejected": sum(naive),
        "fast_decisions_per_s": round(fast_per_s, 1), "naive_decisions_per_s": round(naive_per_s, 3),
        "naive_s": round(naive_s, 2), "speedup": round(fast_per_s / naive_per_s, 1),
        "agree": fast == naive,
    })
    return row


def paper_scale(seed: int, per_skill: int = 1000, skills: int = 5) -> dict:
    start = time.perf_counter()
    for skill in range(skills):
        build(per_skill, seed + 100 + skill)
    return {"per_skill": per_skill, "skills": skills, "seconds": round(time.perf_counter() - start, 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000,50000")
    parser.add_argument("--candidates", type=int, default=24, help="held-out candidates K per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    _, accept_5000 = build(5000, args.seed + 50)
    out = {
        "python": platform.python_version(),
        "threshold": 0.8,
        "accept_5000_one_skill_s": accept_5000["build_s"],
        "paper_scale_1000x5": paper_scale(args.seed),
        "sizes": {str(size): bench_size(size, args.candidates, args.seed) for size in sizes},
    }
    out["agree"] = all(row["agree"] for row in out["sizes"].values())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
