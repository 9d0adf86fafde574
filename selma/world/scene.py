"""The shapes world: its vocabulary, scene graphs (what a caption says), scenes (where the
objects are) and a seeded scene sampler per kind of caption.

Coordinates are in pixels of the 64×64 canvas, x to the right and y downwards; an object is
given by its shape, colour, bounding-box centre and bounding-box side ``size``.

World v2: eight colours, five shapes, counts up to six, two sizes (a caption may call an object
small or large; one it does not size may be either) and four relations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CANVAS = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
# Seen from the white background each colour is a direction in RGB; the evaluator tells colours
# apart by those directions, which are at least 17° apart here (and from black's).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 0),
    "orange": (250, 120, 0),
    "purple": (130, 40, 200),
    "cyan": (0, 190, 220),
    "pink": (240, 70, 180),
}
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
RELATIONS = ("to the left of", "to the right of", "above", "below")
MAX_OBJECTS = 6
# Bounding-box sides (pixels) of small and large objects, and of objects a caption does not size;
# the evaluator calls a detection small below SIZE_SPLIT. Large objects take room: at most
# MAX_LARGE of them fit beside the rest.
SIZES: dict[str, tuple[int, int]] = {"small": (12, 14), "large": (18, 20)}
ANY_SIZE = (12, 20)
SIZE_SPLIT = 16.0
MAX_LARGE = 4
# Kinds of scene / caption the sampler draws; the world skills group them.
KINDS = ("single", "counting", "binding", "spatial", "multi")
SKILL_KINDS: dict[str, tuple[str, ...]] = {
    "world_objects": ("single", "multi"),
    "world_counting": ("counting",),
    "world_binding": ("binding",),
    "world_spatial": ("spatial",),
}

# Sampler geometry (pixels): the margin to the canvas edge and the least gap between two objects'
# bounding boxes; the share of sampled objects given a size word.
EDGE_MARGIN = 1.0
GAP = 2.0
PLACEMENT_TRIES = 2000
SIZED_SHARE = 0.5


@dataclass(frozen=True)
class Entity:
    """``count`` objects of one colour and shape, all ``size`` ("small", "large" or None: either);
    ``say_one`` writes a count of 1 as "one" rather than "a" (it does not take part in comparisons)."""

    count: int
    color: str
    shape: str
    say_one: bool = field(default=False, compare=False)
    size: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Relation:
    """``entities[subject]`` is ``relation`` ``entities[object]``."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class SceneGraph:
    """What a caption says: entities in caption order and spatial relations between them."""

    entities: tuple[Entity, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def num_objects(self) -> int:
        return sum(e.count for e in self.entities)

    @property
    def num_large(self) -> int:
        return sum(e.count for e in self.entities if e.size == "large")

    @property
    def kind(self) -> str:
        """The kind of caption this graph makes (see :data:`KINDS`)."""
        if self.relations:
            return "spatial"
        if len(self.entities) == 1:
            entity = self.entities[0]
            return "single" if entity.count == 1 and not entity.say_one else "counting"
        if (len(self.entities) == 2 and all(e.count == 1 and not e.say_one for e in self.entities)
                and self.entities[0].color != self.entities[1].color
                and self.entities[0].shape != self.entities[1].shape):
            return "binding"
        return "multi"


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    @property
    def centroid(self) -> tuple[float, float]:
        """The centre of mass (a triangle's lies a sixth of its height below the box centre)."""
        return (self.cx, self.cy + self.size / 6) if self.shape == "triangle" else (self.cx, self.cy)


@dataclass(frozen=True)
class Scene:
    """Objects on the canvas and the graph its caption states (the same facts)."""

    objects: tuple[WorldObject, ...]
    graph: SceneGraph
    seed: int | None = None


def relation_holds(subject_xy: tuple[float, float], object_xy: tuple[float, float], relation: str) -> bool:
    """The world's spatial rule on two centroids: the offset's dominant axis and its sign
    ("to the left of": the subject is further left than it is higher or lower)."""
    dx = object_xy[0] - subject_xy[0]
    dy = object_xy[1] - subject_xy[1]
    if relation == "to the left of":
        return dx > abs(dy)
    if relation == "to the right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


# --------------------------------------------------------------------------- sampling


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _pick(rng: np.random.Generator, options, k: int = 1) -> list:
    """``k`` distinct items of ``options`` in random order."""
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _size(rng: np.random.Generator, count: int = 1) -> str | None:
    """No size word (half the time), else small or large (large only for up to MAX_LARGE objects)."""
    if rng.random() >= SIZED_SHARE:
        return None
    return "large" if count <= MAX_LARGE and rng.random() < 0.5 else "small"


def sample_graph(kind: str, seed=None) -> SceneGraph:
    """A random scene graph of ``kind`` (see :data:`KINDS`)."""
    rng = _rng(seed)
    if kind == "single":
        return SceneGraph((Entity(1, _pick(rng, list(COLORS))[0], _pick(rng, SHAPES)[0], size=_size(rng)),))
    if kind == "counting":
        count = int(rng.integers(1, MAX_OBJECTS + 1))
        return SceneGraph((Entity(count, _pick(rng, list(COLORS))[0], _pick(rng, SHAPES)[0], say_one=True,
                                  size=_size(rng, count)),))
    if kind in ("binding", "spatial"):
        colors, shapes = _pick(rng, list(COLORS), 2), _pick(rng, SHAPES, 2)
        if kind == "spatial" and rng.random() < 0.5:
            # Spatial pairs need distinct (colour, shape) only: half share a colour or a shape.
            if rng.random() < 0.5:
                colors[1] = colors[0]
            else:
                shapes[1] = shapes[0]
        entities = (Entity(1, colors[0], shapes[0], size=_size(rng)), Entity(1, colors[1], shapes[1], size=_size(rng)))
        relations = (Relation(0, _pick(rng, RELATIONS)[0], 1),) if kind == "spatial" else ()
        return SceneGraph(entities, relations)
    if kind == "multi":
        # Two or three groups, at most MAX_OBJECTS objects; not the two-object form binding captions take.
        while True:
            groups = int(rng.integers(2, 4))
            pairs = [(c, s) for c in COLORS for s in SHAPES]
            chosen = _pick(rng, pairs, groups)
            counts = [1] * groups
            for _ in range(int(rng.integers(0, MAX_OBJECTS - groups + 1))):
                counts[int(rng.integers(groups))] += 1
            graph = SceneGraph(tuple(Entity(n, c, s, size=_size(rng, n)) for n, (c, s) in zip(counts, chosen)))
            if graph.kind == "multi" and graph.num_large <= MAX_LARGE:
                return graph
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def _separated(a: WorldObject, b: WorldObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _clear_relation(subject: WorldObject, obj: WorldObject, relation: str) -> bool:
    """The relation holds with a margin: the boxes are apart along its axis and the offset
    along it is at least twice the offset across it."""
    (sx, sy), (ox, oy) = subject.centroid, obj.centroid
    horizontal = relation in ("to the left of", "to the right of")
    along, across = (ox - sx, oy - sy) if horizontal else (oy - sy, ox - sx)
    if relation in ("to the right of", "below"):
        along = -along
    reach = (subject.size + obj.size) / 2 + GAP
    return along >= reach and along >= 2 * abs(across)


def place_objects(graph: SceneGraph, seed=None, canvas: int = CANVAS) -> tuple[WorldObject, ...]:
    """Non-overlapping objects for ``graph`` (boxes at least :data:`GAP` apart, inside the canvas)
    with its relations holding clearly; in entity order."""
    rng = _rng(seed)
    wanted = [(e.shape, e.color, SIZES.get(e.size, ANY_SIZE)) for e in graph.entities for _ in range(e.count)]
    index_of_entity = [sum(e.count for e in graph.entities[:number]) for number in range(len(graph.entities))]
    for _ in range(PLACEMENT_TRIES):
        objects: list[WorldObject] = []
        for shape, color, (least, most) in wanted:
            size = float(rng.integers(least, most + 1))
            low, high = EDGE_MARGIN + size / 2, canvas - EDGE_MARGIN - size / 2
            for _ in range(50):
                candidate = WorldObject(shape, color, float(rng.uniform(low, high)), float(rng.uniform(low, high)), size)
                if all(_separated(candidate, other, GAP) for other in objects):
                    objects.append(candidate)
                    break
            else:
                break
        if len(objects) != len(wanted):
            continue
        first = [objects[i] for i in index_of_entity]  # relations join single objects
        if all(_clear_relation(first[r.subject], first[r.object], r.relation) for r in graph.relations):
            return tuple(objects)
    raise RuntimeError(f"could not place {graph} on a {canvas}px canvas")


def sample_scene(kind: str, seed: int | None = None) -> Scene:
    """A random scene of ``kind``; the same seed gives the same scene."""
    rng = np.random.default_rng(seed)
    graph = sample_graph(kind, rng)
    return Scene(place_objects(graph, rng), graph, seed)


def skill_scene(skill: str, seed: int | None = None) -> Scene:
    """A random scene for one of the world skills (:data:`SKILL_KINDS`)."""
    kinds = SKILL_KINDS.get(skill)
    if kinds is None:
        raise ValueError(f"unknown world skill {skill!r}; expected one of {sorted(SKILL_KINDS)}")
    rng = np.random.default_rng(seed)
    kind = kinds[int(rng.integers(len(kinds)))]
    graph = sample_graph(kind, rng)
    return Scene(place_objects(graph, rng), graph, seed)
