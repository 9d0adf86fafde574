"""The world's caption grammar: scene graph → caption, caption → scene graph, and a
deterministic train/test split of captions.

Grammar (lowercase; a leading capital and a final period are accepted)::

    caption  := spatial | list
    spatial  := object RELATION object            "a green triangle to the left of a yellow square"
    list     := item | item " and " item | item (", " item)+ [","] " and " item
    item     := object | "one" [SIZE] COLOR SHAPE   "a blue circle", "one small blue circle"
              | NUMBER [SIZE] COLOR PLURAL           "three red circles" (NUMBER two..six)
    object   := ("a" | "an") [SIZE] COLOR SHAPE      "an orange cross", "a large pink diamond"

with COLOR in red/green/blue/yellow/orange/purple/cyan/pink, SHAPE in circle/square/triangle/
diamond/cross (PLURAL: circles ... crosses), SIZE in small/large, NUMBER in one..six and RELATION
in "to the left of", "to the right of", "above", "below". A caption names each (colour, shape)
at most once, at most six objects in all and at most four large ones; anything else is refused
with a :class:`WorldCaptionError`.

Examples per kind: single "a blue circle"; counting "three red circles", "one small green
square"; binding "a red square and a large blue circle"; spatial "a green triangle to the left
of a yellow square"; multi "two red circles and a blue square", "a red circle, a green cross and
a blue triangle".
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from selma.world.scene import (
    COLORS,
    KINDS,
    MAX_LARGE,
    MAX_OBJECTS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZES,
    Entity,
    Relation,
    Scene,
    SceneGraph,
    sample_scene,
)


class WorldCaptionError(ValueError):
    """A caption outside the world's grammar."""


_COLOR = "|".join(COLORS)
_NOUN = "|".join(sorted([*SHAPES, *PLURALS.values()], key=len, reverse=True))
_NUMBER = "|".join(("a", "an") + NUMBER_WORDS)
_ITEM = re.compile(rf"^(?P<number>{_NUMBER}) (?:(?P<size>{'|'.join(SIZES)}) )?(?P<color>{_COLOR}) (?P<noun>{_NOUN})$")
_SINGULAR = {**{shape: shape for shape in SHAPES}, **{plural: shape for shape, plural in PLURALS.items()}}
_SPATIAL = re.compile(rf"^(?P<subject>.+?) (?P<relation>{'|'.join(RELATIONS)}) (?P<object>.+)$")
_SEPARATOR = re.compile(r"(, and |, | and )")


def normalize_caption(text: str) -> str:
    """Lowercase, single spaces, no final period."""
    text = " ".join(str(text).split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _item(text: str, caption: str) -> Entity:
    match = _ITEM.match(text)
    if not match:
        raise WorldCaptionError(f"{caption!r}: {text!r} is not '<number> [small|large] <colour> <shape>' "
                                f"(colours {', '.join(COLORS)}; shapes {', '.join(SHAPES)}; numbers a, one..six)")
    word, noun = match.group("number"), match.group("noun")
    count = 1 if word in ("a", "an") else NUMBER_WORDS.index(word) + 1
    if (noun not in SHAPES) != (count > 1):
        raise WorldCaptionError(f"{caption!r}: {text!r}: the noun must be {'plural' if count > 1 else 'singular'}")
    return Entity(count, match.group("color"), _SINGULAR[noun], say_one=word == "one", size=match.group("size"))


def _check(graph: SceneGraph, caption: str) -> SceneGraph:
    keys = [e.key for e in graph.entities]
    if len(set(keys)) != len(keys):
        raise WorldCaptionError(f"{caption!r} names the same colour and shape twice")
    if graph.num_objects > MAX_OBJECTS:
        raise WorldCaptionError(f"{caption!r} has {graph.num_objects} objects; the world holds at most {MAX_OBJECTS}")
    if graph.num_large > MAX_LARGE:
        raise WorldCaptionError(f"{caption!r} has {graph.num_large} large objects; at most {MAX_LARGE} fit")
    return graph


def parse_caption(caption: str) -> SceneGraph:
    """The scene graph a world caption states; :class:`WorldCaptionError` when it is not one."""
    text = normalize_caption(caption)
    if not text:
        raise WorldCaptionError("an empty caption")
    spatial = _SPATIAL.match(text)
    if spatial:
        subject, obj = _item(spatial.group("subject"), caption), _item(spatial.group("object"), caption)
        if subject.count != 1 or obj.count != 1 or subject.say_one or obj.say_one:
            raise WorldCaptionError(f"{caption!r}: a spatial relation joins two single objects ('a <colour> <shape>')")
        return _check(SceneGraph((subject, obj), (Relation(0, spatial.group("relation"), 1),)), caption)
    parts = _SEPARATOR.split(text)
    items, separators = parts[0::2], parts[1::2]
    if separators and (separators[-1] not in (" and ", ", and ") or any(s != ", " for s in separators[:-1])):
        raise WorldCaptionError(f"{caption!r}: objects are listed as 'A, B and C'")
    if separators and separators[-1] == ", and " and len(items) < 3:
        raise WorldCaptionError(f"{caption!r}: objects are listed as 'A and B'")
    return _check(SceneGraph(tuple(_item(part, caption) for part in items)), caption)


def is_world_caption(caption: str) -> bool:
    try:
        parse_caption(caption)
    except WorldCaptionError:
        return False
    return True


def _phrase(entity: Entity, numbers: bool = True) -> str:
    words = f"{entity.size} {entity.color}" if entity.size else entity.color
    if entity.count > 1:
        return f"{NUMBER_WORDS[entity.count - 1]} {words} {PLURALS[entity.shape]}" if numbers else \
            f"{words} {PLURALS[entity.shape]}"
    article = "one" if entity.say_one else "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {entity.shape}"


def format_caption(graph: SceneGraph, *, numbers: bool = True) -> str:
    """The caption of a scene graph (the grammar's canonical spelling); with ``numbers=False``
    each group of several is a bare plural ("red circles"), as loose alt-text has it (outside the
    grammar)."""
    phrases = [_phrase(e, numbers) for e in graph.entities]
    if graph.relations:
        if len(graph.relations) != 1 or len(graph.entities) != 2:
            raise WorldCaptionError("the grammar states one relation between two objects")
        relation = graph.relations[0]
        return f"{phrases[relation.subject]} {relation.relation} {phrases[relation.object]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_of(scene: Scene) -> str:
    return format_caption(scene.graph)


# --------------------------------------------------------------------------- train / test split

_INVERSE = {"to the right of": "to the left of", "below": "above"}


def concept_key(graph: SceneGraph) -> str:
    """The caption's content regardless of wording: entities sorted, "B right of A" as "A left of
    B", "one" as "a". Captions with the same key describe the same scenes."""
    entities = sorted((e.color, e.shape, e.count, e.size or "") for e in graph.entities)
    relations = []
    for r in graph.relations:
        subject, obj, relation = graph.entities[r.subject], graph.entities[r.object], r.relation
        if relation in _INVERSE:
            subject, obj, relation = obj, subject, _INVERSE[relation]
        relations.append(f"{subject.color} {subject.shape}|{relation}|{obj.color} {obj.shape}")
    return ";".join(f"{n} {z} {c} {s}".replace("  ", " ") for c, s, n, z in entities) + "#" + ";".join(sorted(relations))


def split_of(caption: str, test_fraction: float = 0.2, salt: str = "") -> str:
    """``"test"`` or ``"train"``: a fixed split by the caption's concept (:func:`concept_key`),
    so a held-out concept is never trained on, whatever its wording or layout."""
    if not 0 <= test_fraction <= 1:
        raise ValueError("test_fraction must be in [0, 1]")
    digest = hashlib.sha256(f"{salt}\x00{concept_key(parse_caption(caption))}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "little") / 2 ** 64 < test_fraction else "train"


def is_training_caption(caption: str) -> bool:
    """A world caption in the train split (the world skills' ``accept``: held-out concepts are
    never generated, so never trained on)."""
    return is_world_caption(caption) and split_of(caption) == "train"


def scene_seed(seed: int, kind: str, index: int) -> int:
    """The seed of the ``index``-th scene of ``kind`` in the stream ``seed``."""
    return int(np.random.SeedSequence([seed, KINDS.index(kind), index]).generate_state(1, np.uint64)[0] >> 1)


def sample_scenes(kind: str, n: int, seed: int = 0, *, split: str | None = None, test_fraction: float = 0.2,
                  salt: str = "") -> list[Scene]:
    """``n`` scenes of ``kind`` from seeds derived from ``seed``; with ``split`` ("train" or
    "test") only scenes whose caption falls in that split."""
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    if split not in (None, "train", "test"):
        raise ValueError("split must be None, 'train' or 'test'")
    scenes: list[Scene] = []
    for index in range(max(n * 200, 1000)):
        if len(scenes) == n:
            break
        scene = sample_scene(kind, scene_seed(seed, kind, index))
        if split is None or split_of(caption_of(scene), test_fraction, salt) == split:
            scenes.append(scene)
    if len(scenes) < n:
        raise RuntimeError(f"found only {len(scenes)} {kind} scenes in the {split} split")
    return scenes


def kind_captions(kind: str) -> list[str]:
    """Every caption of ``kind`` in the grammar's canonical spelling, one per concept (counting,
    binding and spatial; ``split_of`` tells which of them are held out)."""
    sizes = (None, *SIZES)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if kind == "counting":
        graphs = [SceneGraph((Entity(n, c, s, say_one=True, size=z),)) for c, s in pairs
                  for n in range(1, MAX_OBJECTS + 1) for z in sizes if not (z == "large" and n > MAX_LARGE)]
    elif kind == "binding":
        graphs = [SceneGraph((Entity(1, c, s, size=z), Entity(1, c2, s2, size=z2)))
                  for i, (c, s) in enumerate(pairs) for c2, s2 in pairs[i + 1:] if c != c2 and s != s2
                  for z in sizes for z2 in sizes]
    elif kind == "spatial":  # "B right of A" is "A left of B": only left of and above
        graphs = [SceneGraph((Entity(1, c, s, size=z), Entity(1, c2, s2, size=z2)), (Relation(0, r, 1),))
                  for c, s in pairs for c2, s2 in pairs if (c, s) != (c2, s2)
                  for z in sizes for z2 in sizes for r in ("to the left of", "above")]
    else:
        raise ValueError(f"kind_captions takes counting, binding or spatial, not {kind!r}")
    return [format_caption(g) for g in graphs]
