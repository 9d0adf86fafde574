"""The offline ``template`` backend: a compositional phrase generator that stands in for an LLM.

It is for demos, tests and machines without an LLM: it answers each request the way an LLM
continues a numbered list (``5. ...\\n6. ...``), filling the skill's ``patterns`` with random
everyday vocabulary. Its prompts are grammatical but formulaic; use a real LLM backend for data
you intend to train on.

A skill may bring its own ``vocabulary`` (``{slot: [words]}``): its slots are filled from it
before the global :data:`VOCABULARY` (``{slot}``, ``{slots}`` for the plural, ``{a_slot}`` with an
article, ``{slot2}`` for another word of the same slot), and within one prompt its words are drawn
without repetition, so ``{color}`` and ``{color2}`` differ while the slot has words left.
"""

from __future__ import annotations

import random
import re

from selma.llm.base import LLMBackend, LLMRequest, requests_from_batch, with_completions

NUMBER_WORDS = ["one", "two", "three", "four", "five", "six"]

VOCABULARY: dict[str, list[str]] = {
    "object": ["chair", "lamp", "book", "vase", "backpack", "clock", "bicycle", "umbrella", "guitar",
               "teapot", "laptop", "bottle", "basket", "candle", "mirror", "kite", "suitcase", "bench",
               "bucket", "hat", "pillow", "telephone", "camera", "ladder", "bowl", "toaster", "globe"],
    "animal": ["dog", "cat", "horse", "rabbit", "parrot", "turtle", "fox", "elephant", "penguin",
               "owl", "goat", "giraffe", "duck", "squirrel", "zebra", "cow", "bear", "frog"],
    "person": ["woman", "man", "child", "chef", "farmer", "nurse", "musician", "student",
               "firefighter", "painter", "grandmother", "soldier", "dancer", "boy", "girl"],
    "food": ["apple", "sandwich", "pizza", "banana", "cupcake", "donut", "orange", "carrot",
             "pear", "cookie", "pie", "watermelon", "croissant", "taco", "lemon"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"],
    "material": ["wooden", "metal", "glass", "plastic", "stone", "paper", "leather", "wool"],
    "odd_material": ["cheese", "ice", "feathers", "chocolate", "jelly", "bread", "soap", "clouds"],
    "surface": ["table", "kitchen counter", "wooden floor", "picnic blanket", "desk", "shelf",
                "windowsill", "stone wall", "tray", "bed"],
    "place": ["in a sunny park", "on a busy street", "in a quiet library", "at the beach",
              "in a snowy forest", "in a small kitchen", "on a farm", "in a train station",
              "by a lake", "in a crowded market", "on a mountain trail", "in a classroom"],
    "odd_place": ["above a busy highway", "inside a fishbowl", "on the surface of the moon",
                  "at the bottom of the ocean", "in the middle of a desert", "on top of a cloud"],
    "place_thing": ["a tall building", "a row of trees", "a cloudy sky", "a red barn",
                    "a wooden fence", "a river", "a mountain range", "a parking lot"],
    "activity": ["reading a newspaper", "riding a bicycle", "playing the guitar", "cooking dinner",
                 "walking a dog", "painting a fence", "carrying groceries", "flying a kite",
                 "taking a photo", "watering plants"],
    "animal_activity": ["sleeping", "running", "eating grass", "drinking water", "sitting",
                        "jumping over a log", "playing with a ball", "looking at the camera"],
    "human_activity": ["reading a book", "driving a car", "typing on a laptop", "cooking pancakes",
                       "playing chess", "brushing its teeth", "riding a skateboard", "painting a portrait"],
    "human_activity_ing": ["reading a book", "driving a car", "typing on a laptop", "playing chess"],
    "clothing": ["tie", "raincoat", "tuxedo", "cowboy hat", "pair of sunglasses", "scarf"],
    "position": ["next to", "on top of", "under", "behind", "in front of", "to the left of",
                 "to the right of", "above", "below"],
    "side": ["left", "right"],
    "lighting": ["golden hour", "dramatic lighting", "soft morning light", "neon glow",
                 "studio lighting", "moonlight", "overcast light"],
    "medium": ["oil painting", "watercolor", "digital art", "35mm photograph", "pencil sketch",
               "3d render", "concept art", "ukiyo-e print"],
    "quality": ["highly detailed", "8k", "sharp focus", "intricate", "award winning", "cinematic"],
    "artist_style": ["impressionist style", "art nouveau", "studio ghibli style", "baroque",
                     "minimalist", "pop art", "surrealism"],
}
PLURALS = {"person": {"man": "men", "woman": "women", "child": "children"}}
SLOT = re.compile(r"\{([A-Za-z_]+?)(\d?)\}")


def _plural(noun: str) -> str:
    for irregular in PLURALS.values():
        if noun in irregular:
            return irregular[noun]
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class TemplateBackend(LLMBackend):
    """Fills skill patterns with random vocabulary; seeded per request, so fully reproducible."""

    name = "template"

    def __init__(self, skills: dict):
        self.skills = skills

    def generate(self, requests: list[LLMRequest]) -> list[str]:
        return [self._complete(request) for request in requests]

    def _complete(self, request: LLMRequest) -> str:
        skill = self.skills[request.skill]
        rng = random.Random(request.seed)
        patterns = skill.patterns or ["{a_object} {position} {a_object2} {place}."]
        max_count = skill.max_count or len(NUMBER_WORDS)
        vocabulary = skill.vocabulary or {}
        lines = []
        for offset in range(request.num_candidates):
            text = self._fill(rng.choice(patterns), rng, max_count, vocabulary)
            # An LLM continues the list after the last number in the request; so does this.
            lines.append(text if offset == 0 else f"{request.first_index + offset}. {text}")
        return " " + "\n".join(lines)

    def _fill(self, pattern: str, rng: random.Random, max_count: int, vocabulary: dict | None = None) -> str:
        used: dict[str, set[str]] = {}  # the skill vocabulary's words already in this prompt, per slot

        def replace(match: re.Match) -> str:
            return self._word(match.group(1), rng, max_count, vocabulary or {}, used)

        text = SLOT.sub(replace, pattern)
        return text[0].upper() + text[1:]

    @staticmethod
    def _skill_word(slot: str, rng: random.Random, vocabulary: dict, used: dict[str, set[str]]) -> str:
        fresh = [w for w in vocabulary[slot] if w not in used.setdefault(slot, set())] or list(vocabulary[slot])
        word = rng.choice(fresh)
        used[slot].add(word)
        return word

    def _word(self, slot: str, rng: random.Random, max_count: int, vocabulary: dict | None = None,
              used: dict[str, set[str]] | None = None) -> str:
        capital = slot[0].isupper()
        slot = slot.lower()
        vocabulary = vocabulary or {}
        used = {} if used is None else used
        if slot in vocabulary:
            word = self._skill_word(slot, rng, vocabulary, used)
        elif slot.endswith("s") and slot[:-1] in vocabulary:
            word = _plural(self._skill_word(slot[:-1], rng, vocabulary, used))
        elif slot in ("count", "count2"):
            word = rng.choice(NUMBER_WORDS[1:max_count] or NUMBER_WORDS[:1])
        elif slot.startswith("a_"):
            word = _with_article(self._word(slot[2:], rng, max_count, vocabulary, used))
        elif slot in VOCABULARY:
            word = rng.choice(VOCABULARY[slot])
            if rng.random() < 0.35 and slot in ("object", "animal", "food"):
                word = f"{rng.choice(VOCABULARY['color' if slot != 'food' else 'material'])} {word}"
        elif slot == "people":
            word = rng.choice(["people", "children", "women", "men", "students", "musicians"])
        elif slot.endswith("s") and slot[:-1] in VOCABULARY:
            word = _plural(rng.choice(VOCABULARY[slot[:-1]]))
        else:
            raise KeyError(f"pattern slot {{{slot}}} is not in the template vocabulary")
        return word.capitalize() if capital else word


def _complete_batch(batch, skills: dict):
    return with_completions(batch, TemplateBackend(skills).generate(requests_from_batch(batch)))


def template_stage(dataset, skills: dict):
    """Ray Data stage: template completions in light tasks."""
    return dataset.map_batches(_complete_batch, fn_kwargs={"skills": skills}, batch_size=None,
                               batch_format="pyarrow", num_cpus=0.1)
