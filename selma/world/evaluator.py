"""The exact evaluator: what is in an image of the world, DSG-style questions for a caption, their
answers from the image, DSG score and prompt accuracy.

Detection (:func:`detect`), at 64×64 (other sizes are box-resized first):

1. background: the median colour of the image's one-pixel border;
2. pixels → palette: each pixel ``p`` is matched to the palette colour ``c`` whose line
   ``background + a·(c − background)`` passes nearest to it (``a`` ≥ 0), black's line included
   (it stands for dark and grey pixels, which are of no palette colour). The pixel is background
   when its coverage ``a`` on that line is below 0.5, and of no palette colour ("other") when the
   line is black's or the pixel lies further from the line than ``max_off_line`` (0.35, about
   20°) × its distance along it. Anti-aliased and blurred edges are mixtures of an object's
   colour with the background, so they stay on the object's line and are cut at half coverage
   (a plain nearest-palette-colour rule turns some red-on-white edge pixels yellow);
3. connected components (8-connected) per colour; components under ``min_area`` (20) pixels are
   noise;
4. shape: template IoU (:func:`shape_of`) on the component's soft coverage (its colour's
   coverage on the component and two pixels around it, holes filled). Each template (a disk, an
   axis-aligned square, a triangle pointing up, down, left or right, a diamond, a plus-shaped
   cross) is laid on the pixel grid with the object's area and centroid, at 0.96, 1 and 1.04
   times that size, and compared by soft IoU (a hard-edged object, every pixel covered or not,
   with templates sampled at pixel centres, the way it was drawn). The best template names the
   shape when its IoU is at least ``min_iou`` (0.7) and the component's bounding box has an
   aspect ratio of at most ``max_aspect`` (1.6); otherwise the shape is unknown (None).
   Matching area and centroid (rather than stretching the bounding box to a unit square) keeps
   small pixelated circles, whose thresholded box is tight, from looking square; soft coverage
   keeps a one-pixel rim of half-covered edge pixels from deciding between a circle and a square
   with rounded corners;
5. centroid (coverage-weighted, x and y) and bounding box per component.

Questions (:func:`questions`): per entity of the caption's scene graph, in caption order,
"Is there a circle?" / "Are there circles?" (entity/whole, once per shape), "Is the circle red?"
(attribute/color; parent: the shape's question), for a sized entity "Is the red circle small?"
(attribute/size; parent: the colour question) and, for counts above one or a spelled-out
"one", "Are there exactly three red circles?" (other/count; parents: the shape and colour
questions); then per relation "Is the green triangle to the left of the yellow square?"
(relation/spatial; parents: both shapes' questions). Ids start at 1; every answer is "yes".

Answers (:func:`answer_question`) follow from the question text alone (so a VQA backend can give
them): a shape question is "yes" when some component has that shape; a colour question when some
component has that shape and colour; a size question when some component has that shape,
colour and size (:attr:`Detection.size`: small when the best template's side is below
:data:`selma.world.scene.SIZE_SPLIT`); a count question when exactly that many components have
that colour and shape; a spatial question when some pair of such components satisfies the
world's relation rule (:func:`selma.world.scene.relation_holds`: the centroids' offset along the
relation's axis is positive and larger than across it).

Prompt accuracy (:meth:`WorldEvaluator.prompt_accuracy`): every entity's (colour, shape) has
exactly its count of components, all of its size if it has one, every relation holds, and
(unless ``allow_extra``) there is no other component of at least ``min_area`` pixels: none of an
unmentioned colour or shape, of unknown shape or of no palette colour. The DSG questions do not ask about extra objects (as in
DSG), so an image can score 1.0 on them and still fail prompt accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from selma.core.scoring import score_answers
from selma.world.captions import parse_caption
from selma.world.scene import (
    CANVAS,
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZE_SPLIT,
    SIZES,
    SceneGraph,
    relation_holds,
)

MIN_AREA = 20
MIN_IOU = 0.7
MAX_ASPECT = 1.6
MAX_OFF_LINE = 0.35
PALETTE = tuple(COLORS)
NEUTRAL = (0, 0, 0)


class WorldQuestionError(ValueError):
    """A question the world's answerer does not know how to answer."""


@dataclass(frozen=True)
class Detection:
    color: str | None  # None: no palette colour
    shape: str | None  # None: no template fits well enough
    area: int
    centroid: tuple[float, float]  # (x, y), pixel centres at +0.5
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 / y1 exclusive
    iou: float  # IoU with the best template
    side: float = 0.0  # bounding-box side of the best template fitted to the object's area

    @property
    def size(self) -> str:
        """"small" or "large" (by :data:`selma.world.scene.SIZE_SPLIT`)."""
        return "small" if self.side < SIZE_SPLIT else "large"


# --------------------------------------------------------------------------- detection


# (shape, orientation): the shape templates; a triangle may point up, down, left or right.
TEMPLATES = (("circle", ""), ("square", ""), ("triangle", "up"), ("triangle", "down"), ("triangle", "left"),
             ("triangle", "right"), ("diamond", ""), ("cross", ""))
TEMPLATE_SCALES = (0.96, 1.0, 1.04)
TEMPLATE_SUPERSAMPLE = 2  # template coverage from 2×2 samples per pixel


def template_mask(shape: str, orientation: str, cx: float, cy: float, size: float, xs: np.ndarray,
                  ys: np.ndarray) -> np.ndarray:
    """Whether the points (xs, ys) lie inside the shape whose bounding box has centre (cx, cy) and
    side ``size`` (a triangle's apex at the middle of the side it points to)."""
    dx, dy, half = xs - cx, ys - cy, size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "cross":
        arm = half / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    depth, across = {"up": (dy + half, dx), "down": (half - dy, dx), "left": (dx + half, dy),
                     "right": (half - dx, dy)}[orientation]
    return (depth >= 0) & (depth <= size) & (np.abs(across) <= depth / 2)


def _fitted(shape: str, orientation: str, area: float, centroid: tuple[float, float]) -> tuple[float, float, float]:
    """(cx, cy, size) of the template with the component's area and centroid."""
    x, y = centroid
    if shape == "circle":
        return x, y, 2 * np.sqrt(area / np.pi)
    if shape == "square":
        return x, y, np.sqrt(area)
    if shape == "diamond":
        return x, y, np.sqrt(2 * area)
    if shape == "cross":  # five ninths of its box
        return x, y, np.sqrt(9 * area / 5)
    size = np.sqrt(2 * area)
    shift = {"up": (0, size / 6), "down": (0, -size / 6), "left": (size / 6, 0), "right": (-size / 6, 0)}[orientation]
    return x - shift[0], y - shift[1], size


def as_array(image) -> np.ndarray:
    """An RGB image (PIL image or H×W×3 uint8 array) as a 64×64×3 float array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] < 3:
            raise ValueError(f"expected an H×W×3 image array, got shape {image.shape}")
        if image.shape[:2] == (CANVAS, CANVAS):
            return image[..., :3].astype(np.float64)
        image = Image.fromarray(np.asarray(image[..., :3], np.uint8))
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), Image.BOX)
    return np.asarray(image, np.float64)


def classify_pixels(pixels: np.ndarray, max_off_line: float = MAX_OFF_LINE) -> tuple[np.ndarray, np.ndarray]:
    """(labels, coverage): per pixel -1 for background, i for ``PALETTE[i]`` and ``len(PALETTE)``
    for no palette colour; and each palette colour's coverage (H×W×C, from 0)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    offset = pixels - background  # H×W×3
    # The palette's lines, and black's: dark and grey pixels are no palette colour.
    references = np.array([COLORS[name] for name in PALETTE] + [NEUTRAL], np.float64)
    directions = references - background  # (C+1)×3
    lengths = np.maximum(np.linalg.norm(directions, axis=1), 1e-6)
    coverage = np.maximum(np.einsum("hwk,ck->hwc", offset, directions) / lengths ** 2, 0.0)  # H×W×(C+1)
    residual = np.linalg.norm(offset[:, :, None, :] - coverage[..., None] * directions, axis=-1)
    best = residual.argmin(axis=-1)
    best_coverage = np.take_along_axis(coverage, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    labels = np.where(best_residual > max_off_line * best_coverage * lengths[best], len(PALETTE),
                      np.minimum(best, len(PALETTE)))
    return np.where(best_coverage < 0.5, -1, labels), coverage[..., :len(PALETTE)]


def shape_of(alpha: np.ndarray) -> tuple[str, float, float, tuple[float, float], float]:
    """(best shape, its soft IoU, area, centroid (x, y) in the crop, the best template's side) of
    one object's coverage map
    (0..1 per pixel, zero off the object), cropped with a margin around it.

    Each template is laid on the pixel grid with the object's area and centroid (at 0.96, 1 and
    1.04 times that size), its coverage taken from 2×2 samples per pixel, and compared with the
    object by soft IoU (sum of minima over sum of maxima): sub-pixel edges count as much of a
    pixel as they cover, so a one-pixel rim more or less does not decide the shape.
    """
    h, w = alpha.shape
    # A hard-edged map (every pixel 0 or 1, as plain renders draw) is compared with templates
    # sampled at pixel centres, the way it was drawn: small pixelated circles are octagons that
    # 2×2-sampled templates may call squares.
    hard = bool(np.all((alpha < 1e-6) | (alpha > 1 - 1e-6)))
    k = 1 if hard else TEMPLATE_SUPERSAMPLE
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = float(alpha.sum())
    centroid = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))
    sub_x, sub_y = np.meshgrid((np.arange(w * k) + 0.5) / k, (np.arange(h * k) + 0.5) / k)
    best_shape, best_iou, best_side = "", -1.0, 0.0
    for shape, orientation in TEMPLATES:
        cx, cy, size = _fitted(shape, orientation, area, centroid)
        for scale in TEMPLATE_SCALES:
            template = template_mask(shape, orientation, cx, cy, size * scale, sub_x, sub_y)
            template = template.reshape(h, k, w, k).mean(axis=(1, 3))
            iou = float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-9))
            if iou > best_iou:
                best_shape, best_iou, best_side = shape, iou, float(size * scale)
    return best_shape, best_iou, area, centroid, best_side


def detect(image, *, min_area: int = MIN_AREA, min_iou: float = MIN_IOU, max_aspect: float = MAX_ASPECT,
           max_off_line: float = MAX_OFF_LINE) -> list[Detection]:
    """The objects in an image of the world (see the module docstring)."""
    from scipy import ndimage  # optional: scipy is no selma dependency (it comes with the [eval] extra)

    labels, coverage = classify_pixels(as_array(image), max_off_line)
    size = labels.shape[0]
    connectivity = np.ones((3, 3), bool)
    found: list[Detection] = []
    for value in range(len(PALETTE) + 1):
        components, count = ndimage.label(labels == value, structure=connectivity)
        for number, where in enumerate(ndimage.find_objects(components), start=1):
            y0, y1, x0, x1 = where[0].start, where[0].stop, where[1].start, where[1].stop
            area = int((components[where] == number).sum())
            if area < min_area:
                continue
            # The object's neighbourhood: its box with a margin for soft edges and larger templates.
            pad = int(np.ceil(0.2 * max(y1 - y0, x1 - x0))) + 2
            wy0, wy1, wx0, wx1 = max(y0 - pad, 0), min(y1 + pad, size), max(x0 - pad, 0), min(x1 + pad, size)
            mask = components[wy0:wy1, wx0:wx1] == number
            filled = ndimage.binary_fill_holes(mask)
            if value < len(PALETTE):
                # Its colour's coverage on and just around it (soft edges), holes counted in.
                near = ndimage.binary_dilation(filled, structure=connectivity, iterations=2)
                alpha = np.clip(coverage[wy0:wy1, wx0:wx1, value], 0.0, 1.0) * near
                alpha = np.where(filled & ~mask, 1.0, alpha)
            else:
                alpha = filled.astype(np.float64)
            shape, iou, _, (cx, cy), side = shape_of(alpha)
            if iou < min_iou or max(y1 - y0, x1 - x0) > max_aspect * min(y1 - y0, x1 - x0):
                shape = None
            found.append(Detection(color=PALETTE[value] if value < len(PALETTE) else None, shape=shape, area=area,
                                   centroid=(cx + wx0, cy + wy0), bbox=(x0, y0, x1, y1), iou=iou, side=side))
    return found


# --------------------------------------------------------------------------- questions

CATEGORIES = {"whole": "entity", "color": "attribute", "size": "attribute", "count": "other", "spatial": "relation"}


def _plural(shape: str) -> str:
    return PLURALS[shape]


def _row(question_id: int, question: str, parents: list[int], detailed: str) -> dict:
    return {"question_id": question_id, "question": question, "choices": ["yes", "no"], "answer": "yes",
            "parents": parents, "category_broad": CATEGORIES[detailed], "category_detailed": detailed}


def graph_questions(graph: SceneGraph) -> list[dict]:
    """DSG-style question rows for a scene graph (see the module docstring)."""
    rows: list[dict] = []
    shape_question: dict[str, int] = {}
    shape_total = {s: sum(e.count for e in graph.entities if e.shape == s) for s in SHAPES}
    for entity in graph.entities:
        shape, color = entity.shape, entity.color
        if shape not in shape_question:
            text = f"Are there {_plural(shape)}?" if shape_total[shape] > 1 else f"Is there a {shape}?"
            rows.append(_row(len(rows) + 1, text, [], "whole"))
            shape_question[shape] = len(rows)
        text = f"Are the {_plural(shape)} {color}?" if entity.count > 1 else f"Is the {shape} {color}?"
        rows.append(_row(len(rows) + 1, text, [shape_question[shape]], "color"))
        color_question = len(rows)
        if entity.size:
            text = (f"Are the {color} {_plural(shape)} {entity.size}?" if entity.count > 1
                    else f"Is the {color} {shape} {entity.size}?")
            rows.append(_row(len(rows) + 1, text, [color_question], "size"))
        if entity.count > 1 or entity.say_one:
            word = NUMBER_WORDS[entity.count - 1]
            text = (f"Are there exactly {word} {color} {_plural(shape)}?" if entity.count > 1
                    else f"Is there exactly one {color} {shape}?")
            rows.append(_row(len(rows) + 1, text, [shape_question[shape], color_question], "count"))
    for relation in graph.relations:
        subject, obj = graph.entities[relation.subject], graph.entities[relation.object]
        text = f"Is the {subject.color} {subject.shape} {relation.relation} the {obj.color} {obj.shape}?"
        parents = sorted({shape_question[subject.shape], shape_question[obj.shape]})
        rows.append(_row(len(rows) + 1, text, parents, "spatial"))
    return rows


def questions(caption: str) -> list[dict]:
    """DSG-style question rows for a world caption: QUESTION_SCHEMA's columns except item_id,
    prompt and source. Raises :class:`selma.world.captions.WorldCaptionError` for other captions."""
    return graph_questions(parse_caption(caption))


_C, _S, _P = "|".join(COLORS), "|".join(SHAPES), "|".join(PLURALS.values())
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_QUESTION_FORMS = (
    ("whole", re.compile(rf"^(?:is there an? (?P<shape>{_S})|are there (?P<shapes>{_P}))$")),
    ("color", re.compile(rf"^(?:is the (?P<shape>{_S})|are the (?P<shapes>{_P})) (?P<color>{_C})$")),
    ("size", re.compile(rf"^(?:is|are) the (?P<color>{_C}) (?:(?P<shape>{_S})|(?P<shapes>{_P})) "
                        rf"(?P<size>{'|'.join(SIZES)})$")),
    ("count", re.compile(rf"^(?:is|are) there exactly (?P<number>{'|'.join(NUMBER_WORDS)}) (?P<color>{_C}) "
                         rf"(?:(?P<shape>{_S})|(?P<shapes>{_P}))$")),
    ("spatial", re.compile(rf"^is the (?P<color>{_C}) (?P<shape>{_S}) (?P<relation>{'|'.join(RELATIONS)}) "
                           rf"the (?P<color2>{_C}) (?P<shape2>{_S})$")),
)


def parse_question(question: str) -> tuple[str, dict]:
    """(form, fields) of a question :func:`questions` writes."""
    text = " ".join(str(question).lower().split()).rstrip("?").strip()
    for form, pattern in _QUESTION_FORMS:
        match = pattern.match(text)
        if match:
            fields = {k: v for k, v in match.groupdict().items() if v is not None}
            if "shapes" in fields:
                fields["shape"] = _SINGULAR[fields.pop("shapes")]
            return form, fields
    raise WorldQuestionError(f"not a shapes-world question: {question!r}")


def answer_question(detections: list[Detection], question: str) -> str:
    """"yes" or "no" to a world question, from an image's detections."""
    form, f = parse_question(question)
    if form == "whole":
        found = any(d.shape == f["shape"] for d in detections)
    elif form == "color":
        found = any(d.shape == f["shape"] and d.color == f["color"] for d in detections)
    elif form == "size":
        found = any(d.shape == f["shape"] and d.color == f["color"] and d.size == f["size"] for d in detections)
    elif form == "count":
        number = NUMBER_WORDS.index(f["number"]) + 1
        found = sum(d.shape == f["shape"] and d.color == f["color"] for d in detections) == number
    else:
        subjects = [d for d in detections if d.shape == f["shape"] and d.color == f["color"]]
        objects = [d for d in detections if d.shape == f["shape2"] and d.color == f["color2"]]
        found = any(relation_holds(a.centroid, b.centroid, f["relation"]) for a in subjects for b in objects if a is not b)
    return "yes" if found else "no"


def matches(detections: list[Detection], graph: SceneGraph, *, allow_extra: bool = False) -> bool:
    """Whether the detections are exactly what the graph states (see the module docstring)."""
    for entity in graph.entities:
        found = [d for d in detections if d.color == entity.color and d.shape == entity.shape]
        if len(found) != entity.count or (entity.size and any(d.size != entity.size for d in found)):
            return False
    if not allow_extra and len(detections) != graph.num_objects:
        return False
    for relation in graph.relations:
        subject, obj = graph.entities[relation.subject], graph.entities[relation.object]
        subjects = [d for d in detections if (d.color, d.shape) == subject.key]
        objects = [d for d in detections if (d.color, d.shape) == obj.key]
        if not all(relation_holds(a.centroid, b.centroid, relation.relation) for a in subjects for b in objects):
            return False
    return True


def dependency_scores(rows: list[dict], answers: list[str]) -> list[float]:
    """Per question: 1 when answered "yes" (the correct answer) and no parent was answered "no",
    through :func:`selma.core.scoring.score_answers` (DSG's rule, as the benchmarks score)."""
    scored = score_answers([{**row, "image_id": "image", "correct": float(a == row["answer"])}
                            for row, a in zip(rows, answers)])
    return [row["score"] for row in scored]


class WorldEvaluator:
    """Exact evaluation of world images against world captions.

    >>> evaluator = WorldEvaluator()
    >>> rows = evaluator.questions("three red circles")
    >>> evaluator.answer(image, "three red circles", rows)   # ["yes", "yes", "yes"]
    >>> evaluator.prompt_accuracy(image, "three red circles")  # True
    >>> evaluator.dsg_score(image, "three red circles")        # 1.0
    """

    def __init__(self, *, min_area: int = MIN_AREA, min_iou: float = MIN_IOU, max_aspect: float = MAX_ASPECT,
                 max_off_line: float = MAX_OFF_LINE, allow_extra: bool = False):
        self.options = {"min_area": min_area, "min_iou": min_iou, "max_aspect": max_aspect, "max_off_line": max_off_line}
        self.allow_extra = allow_extra

    def detect(self, image) -> list[Detection]:
        return detect(image, **self.options)

    def _detections(self, image_or_detections) -> list[Detection]:
        if isinstance(image_or_detections, list) and all(isinstance(d, Detection) for d in image_or_detections):
            return image_or_detections
        return self.detect(image_or_detections)

    @staticmethod
    def questions(caption: str) -> list[dict]:
        return questions(caption)

    def answer(self, image, caption: str | None, rows: list[dict] | list[str] | None = None) -> list[str]:
        """"yes"/"no" per question (rows or question texts; default: the caption's questions).
        Answers depend on the question text only; ``caption`` supplies the default questions."""
        if rows is None:
            rows = questions(caption)
        detections = self._detections(image)
        return [answer_question(detections, r["question"] if isinstance(r, dict) else r) for r in rows]

    def prompt_accuracy(self, image, caption: str) -> bool:
        return matches(self._detections(image), parse_caption(caption), allow_extra=self.allow_extra)

    def dsg_score(self, image, caption: str) -> float:
        rows = questions(caption)
        scores = dependency_scores(rows, self.answer(image, caption, rows))
        return sum(scores) / len(scores)

    def evaluate(self, image, caption: str) -> dict:
        """Everything at once: detections, question rows with answers and scores, DSG score and
        prompt accuracy (one detection pass)."""
        detections = self.detect(image)
        rows = questions(caption)
        answers = self.answer(detections, caption, rows)
        scores = dependency_scores(rows, answers)
        return {"prompt_accuracy": self.prompt_accuracy(detections, caption),
                "dsg_score": sum(scores) / len(scores),
                "questions": [{**row, "vqa_answer": a, "score": s} for row, a, s in zip(rows, answers, scores)],
                "detections": detections}


# --------------------------------------------------------------------------- selma eval adapters


def question_rows(prompts: list[dict]) -> list[dict]:
    """QUESTION_SCHEMA rows for ``{item_id, prompt, source}`` dicts of world captions."""
    return [{"item_id": p["item_id"], "prompt": p["prompt"], "source": p.get("source") or "world", **row}
            for p in prompts for row in questions(p["prompt"])]


class WorldVQA:
    """A VQA backend answering world questions exactly from the image: the interface of
    ``selma.eval.vqa.VQABackend`` (``answer``, ``yes_probability``, ``close``, a context manager),
    which ``selma.eval`` builds on this package, not the other way round."""

    name = "world"

    def __init__(self, evaluator: WorldEvaluator | None = None):
        self.evaluator = evaluator or WorldEvaluator()

    def _answers(self, images: list, questions_: list[str]) -> list[str]:
        if len(images) != len(questions_):
            raise ValueError(f"{len(images)} images but {len(questions_)} questions: VQA takes (image, question) pairs")
        cache: dict[int, list[Detection]] = {}
        out = []
        for image, question in zip(images, questions_):
            if id(image) not in cache:
                cache[id(image)] = self.evaluator.detect(image)
            out.append(answer_question(cache[id(image)], question))
        return out

    def answer(self, images: list, questions: list[str]) -> list[str]:
        return self._answers(images, questions)

    def yes_probability(self, images: list, questions: list[str]) -> list[float]:
        return [1.0 if a == "yes" else 0.0 for a in self._answers(images, questions)]

    def close(self) -> None:
        """Nothing to release: no model."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class WorldAccuracyScorer:
    """Prompt accuracy as a reward scorer (``score(images, prompts)`` → 1.0 / 0.0 per pair), the
    interface of ``selma.eval.rewards.RewardScorer``."""

    name = "world_accuracy"

    def __init__(self, evaluator: WorldEvaluator | None = None):
        self.evaluator = evaluator or WorldEvaluator()

    def score(self, images, prompts) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return [float(self.evaluator.prompt_accuracy(i, p)) for i, p in zip(images, prompts)]
