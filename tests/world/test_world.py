"""The shapes world: scenes, renders, the caption grammar, the world skills and the exact evaluator."""

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from selma.eval.questions import QUESTION_SCHEMA, question_table, score_answers
from selma.llm.base import LLMRequest
from selma.llm.template import TemplateBackend
from selma.prompts.parse import parse_completion
from selma.skills import Skill, SkillError, load_registry, load_skill_file
from selma.world import (
    COLORS,
    KINDS,
    SHAPES,
    SKILL_FILES,
    SKILL_KINDS,
    Detection,
    Entity,
    Relation,
    Scene,
    SceneGraph,
    WorldAccuracyScorer,
    WorldCaptionError,
    WorldEvaluator,
    WorldObject,
    WorldQuestionError,
    WorldVQA,
    caption_of,
    format_caption,
    parse_caption,
    question_rows,
    questions,
    render,
    render_image,
    sample_scene,
    sample_scenes,
    split_of,
)
from selma.world.captions import concept_key, kind_captions
from selma.world.evaluator import answer_question, detect, parse_question
from selma.world.scene import (
    ANY_SIZE,
    BACKGROUND,
    CANVAS,
    GAP,
    MAX_LARGE,
    MAX_OBJECTS,
    NUMBER_WORDS,
    SIZE_SPLIT,
    SIZES,
    relation_holds,
)

VARIANTS = {
    "plain": {},
    "soft_edges": {"supersample": 4},
    "rounded": {"supersample": 4, "corner_radius": 0.4},
    "rounded_blur_noise": {"supersample": 4, "corner_radius": 0.4, "blur": 0.8, "noise": 6.0},
}
EVALUATOR = WorldEvaluator()


def _truth(scene: Scene) -> list[Detection]:
    """What an ideal detector would report: the scene's own objects."""
    return [Detection(o.color, o.shape, 0, o.centroid, (0, 0, 0, 0), 1.0, side=o.size) for o in scene.objects]


# --------------------------------------------------------------------------- scenes and renders


def test_the_same_seed_gives_the_same_scene_and_pixels_and_other_seeds_differ():
    for kind in KINDS:
        first, again = sample_scene(kind, 11), sample_scene(kind, 11)
        assert first == again
        for options in VARIANTS.values():
            assert np.array_equal(render(first, **options), render(again, **options))
        others = [sample_scene(kind, seed) for seed in range(20)]
        assert len({s.objects for s in others}) == 20
        assert not np.array_equal(render(others[0]), render(others[1]))
    assert [caption_of(s) for s in sample_scenes("spatial", 30, seed=3)] == \
        [caption_of(s) for s in sample_scenes("spatial", 30, seed=3)]
    assert [caption_of(s) for s in sample_scenes("spatial", 30, seed=3)] != \
        [caption_of(s) for s in sample_scenes("spatial", 30, seed=4)]


@pytest.mark.parametrize("kind", KINDS)
def test_renders_show_what_the_scene_says(kind):
    scenes = sample_scenes(kind, 60, seed=1)
    assert {s.graph.kind for s in scenes} == {kind}
    if kind == "counting":
        assert {s.graph.entities[0].count for s in scenes} == {1, 2, 3, 4, 5, 6}
    if kind == "multi":
        assert max(s.graph.num_objects for s in scenes) == 6
    for scene in scenes:
        objects = scene.objects
        assert 1 <= len(objects) <= MAX_OBJECTS and len(objects) == scene.graph.num_objects
        # Counts, colours and shapes per entity are the objects'.
        assert Counter((o.color, o.shape) for o in objects) == {e.key: e.count for e in scene.graph.entities}
        # Sizes: small 12–14 px, large 18–20 px (at most MAX_LARGE), unsized anywhere in 12–20.
        assert scene.graph.num_large <= MAX_LARGE
        for entity in scene.graph.entities:
            least, most = {"small": (12, 14), "large": (18, 20), None: (12, 20)}[entity.size]
            assert all(least <= o.size <= most for o in objects if (o.color, o.shape) == entity.key)
        for o in objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 and 0 <= y0 and x1 <= CANVAS and y1 <= CANVAS
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                assert ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0
        for relation in scene.graph.relations:
            subject, obj = objects[relation.subject], objects[relation.object]
            assert relation_holds(subject.centroid, obj.centroid, relation.relation)
        pixels = render(scene)
        labels, count = ndimage.label((pixels != BACKGROUND).any(axis=-1), structure=np.ones((3, 3)))
        assert count == len(objects)
        for number in range(1, count + 1):
            colors = {tuple(c) for c in pixels[labels == number]}
            assert len(colors) == 1
            ys, xs = np.nonzero(labels == number)
            # The component's colour is that of the object whose box holds its centre.
            owner = [o for o in objects if o.bbox[0] <= xs.mean() + 0.5 <= o.bbox[2] and o.bbox[1] <= ys.mean() + 0.5 <= o.bbox[3]]
            assert len(owner) == 1 and colors.pop() == COLORS[owner[0].color]


def test_the_sampled_world_holds_every_colour_shape_size_and_count():
    scenes = [s for kind in KINDS for s in sample_scenes(kind, 100, seed=3)]
    entities = [e for s in scenes for e in s.graph.entities]
    assert {e.color for e in entities} == set(COLORS) == {"red", "green", "blue", "yellow", "orange", "purple", "cyan",
                                                          "pink"}
    assert {e.shape for e in entities} == set(SHAPES) == {"circle", "square", "triangle", "diamond", "cross"}
    assert {e.size for e in entities} == {None, "small", "large"}
    assert {s.graph.num_objects for s in scenes} == set(range(1, 7))
    assert max(s.graph.num_large for s in scenes) == MAX_LARGE == 4
    assert SIZES == {"small": (12, 14), "large": (18, 20)} and ANY_SIZE == (12, 20)
    assert SIZES["small"][1] < SIZE_SPLIT < SIZES["large"][0]


def test_a_rendered_triangle_points_up_and_its_centroid_is_the_scenes():
    obj = WorldObject("triangle", "red", 32.0, 32.0, 40.0)
    pixels = render(Scene((obj,), SceneGraph((Entity(1, "red", "triangle"),))), supersample=4)
    mask = (pixels != BACKGROUND).any(axis=-1)
    coverage = (255.0 - pixels[..., 1]) / (255 - COLORS["red"][1])
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    centroid = ((coverage * xs).sum() / coverage.sum(), (coverage * ys).sum() / coverage.sum())
    assert abs(centroid[0] - obj.centroid[0]) < 0.1 and abs(centroid[1] - obj.centroid[1]) < 0.1
    assert mask[14].sum() < 6 and mask[49].sum() > 35  # narrow at the top, wide at the base


def test_a_rendered_diamond_and_cross_have_their_outlines():
    def drawn(shape: str) -> np.ndarray:
        obj = WorldObject(shape, "cyan", 32.0, 32.0, 36.0)  # box 14..50
        return (render(Scene((obj,), SceneGraph((Entity(1, "cyan", shape),)))) != BACKGROUND).any(axis=-1)

    diamond = drawn("diamond")
    assert diamond[32].sum() == 36 and diamond[:, 32].sum() == 36  # corners at the box's edge midpoints
    assert [diamond[row].sum() for row in (14, 15, 23)] == [2, 4, 20] and not diamond[14:20, 14:20].any()
    assert diamond.sum() == pytest.approx(36 * 36 / 2, rel=0.08)
    cross = drawn("cross")
    assert cross[32].sum() == 36 and cross[:, 32].sum() == 36  # arms out to the box
    assert cross[15].sum() == 12 and cross[15, 26:38].all()  # arms a third of the side wide
    assert not cross[14:26, 14:26].any() and not cross[38:50, 38:50].any()
    assert cross.sum() == pytest.approx(36 * 36 * 5 / 9, rel=0.08)


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize("kind", KINDS)
def test_captions_round_trip_through_the_parser(kind):
    captions = set()
    for scene in sample_scenes(kind, 500, seed=2):
        caption = caption_of(scene)
        graph = parse_caption(caption)
        assert graph == scene.graph and graph.kind == kind
        assert format_caption(graph) == caption
        assert parse_caption(caption[0].upper() + caption[1:] + ".") == graph
        captions.add(caption)
    assert len(captions) >= {"single": 110, "counting": 300, "binding": 450, "spatial": 490, "multi": 490}[kind]


@pytest.mark.parametrize("caption, graph", [
    ("three red circles", SceneGraph((Entity(3, "red", "circle"),))),
    ("One green square.", SceneGraph((Entity(1, "green", "square", say_one=True),))),
    ("a red square and a blue circle", SceneGraph((Entity(1, "red", "square"), Entity(1, "blue", "circle")))),
    ("A green triangle to the left of a yellow square",
     SceneGraph((Entity(1, "green", "triangle"), Entity(1, "yellow", "square")), (Relation(0, "to the left of", 1),))),
    ("two red circles, a green square, and a blue triangle",
     SceneGraph((Entity(2, "red", "circle"), Entity(1, "green", "square"), Entity(1, "blue", "triangle")))),
    ("six pink crosses", SceneGraph((Entity(6, "pink", "cross"),))),
    ("five small cyan diamonds", SceneGraph((Entity(5, "cyan", "diamond", size="small"),))),
    ("one large purple cross", SceneGraph((Entity(1, "purple", "cross", say_one=True, size="large"),))),
    ("An orange circle", SceneGraph((Entity(1, "orange", "circle"),))),
    ("a orange circle", SceneGraph((Entity(1, "orange", "circle"),))),
    ("a large orange cross below an orange diamond",
     SceneGraph((Entity(1, "orange", "cross", size="large"), Entity(1, "orange", "diamond")),
                (Relation(0, "below", 1),))),
    ("three large red circles and three small blue crosses",
     SceneGraph((Entity(3, "red", "circle", size="large"), Entity(3, "blue", "cross", size="small")))),
    ("four large red circles, a small blue cross and a green square",
     SceneGraph((Entity(4, "red", "circle", size="large"), Entity(1, "blue", "cross", size="small"),
                 Entity(1, "green", "square")))),
])
def test_the_parser_reads_the_grammar(caption, graph):
    assert parse_caption(caption) == graph


@pytest.mark.parametrize("caption, canonical", [
    ("a orange circle", "an orange circle"),
    ("An orange circle.", "an orange circle"),
    ("an red circle", "a red circle"),
    ("an large orange cross", "a large orange cross"),
    ("a small red square and a orange diamond", "a small red square and an orange diamond"),
    ("a purple triangle to the left of a orange cross", "a purple triangle to the left of an orange cross"),
    ("two orange crosses and a orange square", "two orange crosses and an orange square"),
    ("one orange circle", "one orange circle"),
])
def test_the_article_follows_the_next_word_and_either_article_parses(caption, canonical):
    graph = parse_caption(caption)
    assert format_caption(graph) == canonical and parse_caption(canonical) == graph
    assert split_of(caption) == split_of(canonical)


@pytest.mark.parametrize("caption, message", [
    ("", "empty"),
    ("three red", "is not '<number> \\[small\\|large\\] <colour> <shape>'"),
    ("three brown circles", "is not '<number>"),
    ("seven red circles", "is not '<number>"),
    ("three medium red circles", "is not '<number>"),
    ("a large small red circle", "is not '<number>"),
    ("a red large circle", "is not '<number>"),
    ("three red crosss", "is not '<number>"),
    ("three red cross", "must be plural"),
    ("a red crosses", "must be singular"),
    ("one small red diamonds", "must be singular"),
    ("a red circle and a red circle", "same colour and shape twice"),
    ("a small red cross and a large red cross", "same colour and shape twice"),
    ("four red circles and three blue squares", "7 objects"),
    ("six red crosses and a blue square", "7 objects"),
    ("five large red circles", "5 large objects"),
    ("six large cyan triangles", "6 large objects"),
    ("three large red circles and two large blue crosses", "5 large objects"),
    ("a large red circle, a large blue square, a large green cross, a large pink diamond and a large cyan triangle",
     "5 large objects"),
    ("a red circle near a blue square", "is not '<number>"),
    ("two red circles to the left of a blue square", "two single objects"),
    ("one red circle above a blue square", "two single objects"),
    ("a red circle, a blue square", "listed as 'A, B and C'"),
    ("a red circle and a blue square and a green triangle", "listed as 'A, B and C'"),
    ("a red circle, and a blue square", "listed as 'A and B'"),
    ("three red circles on a table", "is not '<number>"),
])
def test_the_parser_refuses_what_is_not_in_the_grammar(caption, message):
    with pytest.raises(WorldCaptionError, match=message):
        parse_caption(caption)


def test_the_train_test_split_is_by_concept_and_deterministic():
    left = "a red circle to the left of a blue square"
    assert split_of(left) == split_of("A blue square to the right of a red circle.")
    assert split_of("a red square and a blue circle") == split_of("a blue circle and a red square")
    assert split_of("one red circle") == split_of("a red circle")
    for kind in ("counting", "spatial", "multi"):
        test = {caption_of(s) for s in sample_scenes(kind, 60, seed=0, split="test")}
        train = {caption_of(s) for s in sample_scenes(kind, 200, seed=0, split="train")}
        assert test and not test & train
        assert all(split_of(c) == "test" for c in test)
    every = {caption_of(s) for s in sample_scenes("spatial", 1500, seed=9)}
    assert 0.1 < sum(split_of(c) == "test" for c in every) / len(every) < 0.3
    assert any(split_of(c, salt="other") != split_of(c) for c in every)
    # A size word makes a concept of its own ("a red circle" does not say which size).
    sized = {concept_key(parse_caption(c)) for c in ("a red circle", "a small red circle", "a large red circle")}
    assert len(sized) == 3


@pytest.mark.parametrize("kind, concepts, least_train", [("counting", 640, 500), ("binding", 5040, 500),
                                                         ("spatial", 28080, 500)])
def test_kind_captions_enumerates_each_concept_of_a_kind_once(kind, concepts, least_train):
    captions = kind_captions(kind)
    graphs = [parse_caption(c) for c in captions]
    assert len(captions) == concepts
    assert len({concept_key(g) for g in graphs}) == concepts  # no concept twice
    assert all(g.kind == kind and format_caption(g) == c for g, c in zip(graphs, captions))
    assert sum(split_of(c) == "train" for c in captions) >= least_train
    # Every concept the sampler draws is among them.
    enumerated = {concept_key(g) for g in graphs}
    assert all(concept_key(s.graph) in enumerated for s in sample_scenes(kind, 300, seed=13))
    if kind == "counting":  # 40 (colour, shape) pairs × six counts × three sizes, less five and six large
        assert Counter((g.entities[0].count, g.entities[0].size) for g in graphs) == {
            (n, z): 40 for n in range(1, 7) for z in (None, "small", "large") if not (z == "large" and n > 4)}


def test_kind_captions_takes_only_the_enumerated_kinds():
    for kind in ("single", "multi", "counting "):
        with pytest.raises(ValueError, match="counting, binding or spatial"):
            kind_captions(kind)


# --------------------------------------------------------------------------- skills


def _refusal(caption: str) -> str:
    """Why a world skill's ``accept`` refuses a caption: "test" (a held-out concept) or the grammar's error."""
    try:
        return split_of(caption)
    except WorldCaptionError as err:
        return str(err)


def test_the_world_skills_load_and_the_template_backend_writes_world_captions():
    registry = load_registry(SKILL_FILES)
    assert set(SKILL_KINDS) <= set(registry) and "coco" in registry
    backend = TemplateBackend(registry)
    words = set()
    for name, kinds in SKILL_KINDS.items():
        skill = registry[name]
        accepts = skill.acceptor()
        assert len(skill.seeds) >= 10 and len(set(skill.seeds)) == len(skill.seeds)
        for seed in skill.seeds:
            assert parse_caption(seed).kind in kinds and split_of(seed) == "train" and accepts(seed)
        requests = [LLMRequest(name, skill.render_instruction(skill.seed_prompts(3), 20), seed, 20, 4) for seed in range(15)]
        seen_kinds, captions, refused = set(), set(), 0
        for completion in backend.generate(requests):
            candidates, unparseable = parse_completion(completion)
            assert unparseable == 0 and len(candidates) >= 5
            for text in candidates:
                if not accepts(text):
                    # Held out, or (counting) more large objects than fit: "five large red circles".
                    reason = _refusal(text)
                    assert reason == "test" or (name == "world_counting" and "large objects; at most 4" in reason), text
                    refused += 1
                    continue
                graph = parse_caption(text)
                assert graph.kind in kinds and len(text.split()) < skill.max_words
                if skill.max_count:
                    assert all(e.count <= max(skill.max_count, 1) for e in graph.entities)
                seen_kinds.add(graph.kind)
                captions.add(text)
                words.update(text.lower().replace(",", "").split())
        assert refused < 0.35 * (len(captions) + refused)
        assert seen_kinds == set(kinds)
        least = {"world_objects": 150, "world_counting": 120, "world_binding": 180, "world_spatial": 200}[name]
        assert len(captions) >= least
    assert {*COLORS, *SHAPES, "crosses", "diamonds", "small", "large", "a", "an", *NUMBER_WORDS} <= words


def test_the_template_backend_reaches_nearly_every_training_counting_concept():
    """Asked enough, the counting skill's templates write ≥ 500 of the 518 counting concepts of
    the train split (kind_captions enumerates the 640), and no held-out one."""
    registry = load_registry(SKILL_FILES)
    skill, backend = registry["world_counting"], TemplateBackend(registry)
    accepts = skill.acceptor()
    train = {concept_key(parse_caption(c)) for c in kind_captions("counting") if split_of(c) == "train"}
    requests = [LLMRequest("world_counting", "", seed, 20, 4) for seed in range(400)]
    written = {concept_key(parse_caption(text)) for completion in backend.generate(requests)
               for text in parse_completion(completion)[0] if accepts(text)}
    assert written <= train and len(written) >= 500


def test_a_skill_vocabulary_comes_before_the_global_one_and_draws_distinct_words(tmp_path):
    skill = Skill(name="mine", description="d", seeds=["x y z"], patterns=["{a_color} {shape} and {a_color2} {shapes2}"],
                  vocabulary={"color": ["mauve", "teal"], "shape": ["blob", "box"]})
    backend = TemplateBackend({"mine": skill})
    texts = [t for seed in range(10) for t in parse_completion(backend.generate([LLMRequest("mine", "", seed, 10, 4)])[0])[0]]
    assert texts and all(t in ("A mauve blob and a teal boxes", "A mauve box and a teal blobs",
                               "A teal blob and a mauve boxes", "A teal box and a mauve blobs") for t in texts)
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ndescription: d\nseeds: [a b c]\nvocabulary: {Color: [red]}\n")
    with pytest.raises(SkillError, match="lowercase letters"):
        load_skill_file(path)
    path.write_text("name: bad\ndescription: d\nseeds: [a b c]\nvocabulary: {color: []}\n")
    with pytest.raises(SkillError, match="non-empty list"):
        load_skill_file(path)


# --------------------------------------------------------------------------- evaluator


# Scenes per kind, and the least object side (pixels) whose detections must fit their template by
# IoU ≥ 0.75: blurred, noisy renders with rounded corners are read exactly too, but their 12 px
# objects can fit below that.
EXACT_READING = {"plain": (160, 0), "soft_edges": (160, 0), "rounded": (60, 0), "rounded_blur_noise": (80, 13)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_evaluator_scores_ground_truth_renders_perfectly(variant):
    per_kind, least_fitted_side = EXACT_READING[variant]
    scenes = [scene for kind in KINDS for scene in sample_scenes(kind, per_kind, seed=5)]
    # What the scenes hold: every shape and colour, both sizes, six objects, four large ones.
    entities = [e for s in scenes for e in s.graph.entities]
    assert {e.shape for e in entities} == set(SHAPES) and {e.color for e in entities} == set(COLORS)
    assert {e.size for e in entities} == {None, "small", "large"}
    assert {s.graph.num_objects for s in scenes} >= {1, 6} and max(s.graph.num_large for s in scenes) == MAX_LARGE
    for scene in scenes:
        caption = caption_of(scene)
        result = EVALUATOR.evaluate(render(scene, **VARIANTS[variant]), caption)
        assert result["prompt_accuracy"], (variant, caption, result["detections"])
        assert result["dsg_score"] == 1.0
        assert all(q["vqa_answer"] == "yes" for q in result["questions"])
        assert all(d.iou >= 0.75 for d in result["detections"] if d.side >= least_fitted_side)


@pytest.mark.parametrize("supersample", [1, 4])
def test_every_shape_at_every_size_and_position_is_read_as_its_shape_and_size(supersample):
    """Each shape at each side the world draws (12–20 px), at sub-pixel offsets: one detection of
    its shape and colour; small sides (12–14) read small, large ones (18–20) large."""
    wrong = []
    for shape in SHAPES:
        for side in range(ANY_SIZE[0], ANY_SIZE[1] + 1):
            for dx, dy in ((0.0, 0.0), (0.5, 0.5), (0.25, 0.75), (0.875, 0.125), (0.125, 0.5)):
                obj = WorldObject(shape, "orange", 31.0 + dx, 30.0 + dy, float(side))
                scene = Scene((obj,), SceneGraph((Entity(1, "orange", shape),)))
                found = detect(render(scene, supersample=supersample))
                want = "small" if side <= SIZES["small"][1] else "large" if side >= SIZES["large"][0] else None
                if [(d.color, d.shape) for d in found] != [("orange", shape)] or want not in (None, found[0].size):
                    wrong.append((shape, side, dx, dy, [(d.color, d.shape, d.size, round(d.side, 1)) for d in found]))
    assert not wrong


def test_larger_images_are_read_at_the_worlds_size():
    for scene in sample_scenes("multi", 20, seed=6):
        assert EVALUATOR.prompt_accuracy(render_image(scene, size=256, supersample=2), caption_of(scene))


@pytest.mark.parametrize("kind, ceiling", [("single", 0.08), ("counting", 0.05), ("binding", 0.05),
                                           ("spatial", 0.05), ("multi", 0.05)])
def test_mismatched_pairs_score_what_the_scenes_really_share(kind, ceiling):
    """Each caption against another scene's render: the evaluator says yes exactly when that scene
    satisfies the caption, which is rare (near chance)."""
    captions = [caption_of(s) for s in sample_scenes(kind, 200, seed=7)]
    others = sample_scenes(kind, 200, seed=8)
    verdicts = [EVALUATOR.prompt_accuracy(render(s, supersample=4), c) for c, s in zip(captions, others)]
    truths = [EVALUATOR.prompt_accuracy(_truth(s), c) for c, s in zip(captions, others)]
    assert verdicts == truths
    assert sum(verdicts) / len(verdicts) <= ceiling
    dsg = [EVALUATOR.dsg_score(render(s), c) for c, s in zip(captions[:60], others[:60])]
    assert np.mean(dsg) < 0.8


def test_swapped_attributes_and_relations_are_caught():
    scene = Scene((WorldObject("square", "red", 16, 32, 16), WorldObject("circle", "blue", 48, 32, 16)),
                  SceneGraph((Entity(1, "red", "square"), Entity(1, "blue", "circle")), (Relation(0, "to the left of", 1),)))
    image = render(scene, supersample=4)
    assert EVALUATOR.prompt_accuracy(image, "a red square to the left of a blue circle")
    assert EVALUATOR.prompt_accuracy(image, "a blue circle to the right of a red square")
    assert EVALUATOR.prompt_accuracy(image, "a red square and a blue circle")
    assert EVALUATOR.dsg_score(image, "a red square") == 1.0  # DSG does not ask about extra objects
    for wrong in ("a blue square and a red circle", "a red square to the right of a blue circle",
                  "a red square above a blue circle", "a red square", "two red squares and a blue circle",
                  "a red square, a blue circle and a green triangle", "a red circle and a blue square"):
        assert not EVALUATOR.prompt_accuracy(image, wrong), wrong
    assert WorldEvaluator(allow_extra=True).prompt_accuracy(image, "a red square")


def test_sizes_are_read_and_a_wrong_size_is_caught():
    scene = Scene((WorldObject("circle", "red", 16, 16, 19), WorldObject("cross", "orange", 48, 16, 13),
                   WorldObject("cross", "orange", 48, 46, 13), WorldObject("diamond", "pink", 16, 46, 19)),
                  SceneGraph((Entity(1, "red", "circle", size="large"), Entity(2, "orange", "cross", size="small"),
                              Entity(1, "pink", "diamond", size="large"))))
    for image in (render(scene), render(scene, supersample=4)):
        sizes = {(d.color, d.shape): d.size for d in EVALUATOR.detect(image)}
        assert sizes == {("red", "circle"): "large", ("orange", "cross"): "small", ("pink", "diamond"): "large"}
        assert EVALUATOR.prompt_accuracy(image, caption_of(scene))
        # A caption that gives no size takes either.
        assert EVALUATOR.prompt_accuracy(image, "a red circle, two orange crosses and a pink diamond")
        for wrong in ("a small red circle, two small orange crosses and a large pink diamond",
                      "a large red circle, two large orange crosses and a large pink diamond",
                      "a large red circle, two orange crosses and a small pink diamond"):
            assert not EVALUATOR.prompt_accuracy(image, wrong), wrong
        caption = "a small red circle, two small orange crosses and a pink diamond"
        rows = questions(caption)
        assert [(r["question"], a) for r, a in zip(rows, EVALUATOR.answer(image, caption, rows))] == [
            ("Is there a circle?", "yes"), ("Is the circle red?", "yes"), ("Is the red circle small?", "no"),
            ("Are there crosses?", "yes"), ("Are the crosses orange?", "yes"), ("Are the orange crosses small?", "yes"),
            ("Are there exactly two orange crosses?", "yes"), ("Is there a diamond?", "yes"),
            ("Is the diamond pink?", "yes")]
        assert EVALUATOR.dsg_score(image, caption) == pytest.approx(8 / 9)
    # "Two small orange crosses" needs both small: one large cross among them fails it.
    mixed = Scene(scene.objects[:2] + (WorldObject("cross", "orange", 48, 46, 19),), scene.graph)
    assert not EVALUATOR.prompt_accuracy(render(mixed), "a large red circle and two small orange crosses")
    assert EVALUATOR.prompt_accuracy(render(mixed), "a large red circle and two orange crosses")
    assert EVALUATOR.answer(render(mixed), None, ["Are the orange crosses small?", "Are the orange crosses large?"]) \
        == ["yes", "yes"]


def test_a_detection_is_small_below_the_size_split():
    def circle(side: float) -> Detection:
        return Detection("red", "circle", 100, (20.0, 20.0), (0, 0, 0, 0), 1.0, side=side)

    assert SIZE_SPLIT == 16.0
    assert [circle(side).size for side in (12.0, 14.0, 15.99, 16.0, 18.0, 20.0)] == \
        ["small", "small", "small", "large", "large", "large"]
    assert answer_question([circle(14.0)], "Is the red circle small?") == "yes"
    assert answer_question([circle(14.0)], "Is the red circle large?") == "no"
    assert answer_question([circle(16.0)], "Is the blue circle large?") == "no"
    assert answer_question([circle(16.0)], "Is the red square large?") == "no"


@pytest.mark.parametrize("question, parsed", [
    ("Is the red circle small?", ("size", {"color": "red", "shape": "circle", "size": "small"})),
    ("Are the pink crosses large?", ("size", {"color": "pink", "shape": "cross", "size": "large"})),
    ("are the orange diamonds small", ("size", {"color": "orange", "shape": "diamond", "size": "small"})),
    ("Are there crosses?", ("whole", {"shape": "cross"})),
    ("Is there a cross?", ("whole", {"shape": "cross"})),
    ("Are the crosses cyan?", ("color", {"color": "cyan", "shape": "cross"})),
    ("Are there exactly six purple crosses?", ("count", {"number": "six", "color": "purple", "shape": "cross"})),
    ("Is the orange cross above the cyan diamond?",
     ("spatial", {"color": "orange", "shape": "cross", "relation": "above", "color2": "cyan", "shape2": "diamond"})),
])
def test_questions_of_the_v2_world_parse(question, parsed):
    assert parse_question(question) == parsed


def test_objects_of_no_palette_colour_or_shape_are_extra_objects():
    pixels = render(Scene((WorldObject("circle", "red", 16, 16, 16),), SceneGraph((Entity(1, "red", "circle"),))))
    blob = pixels.copy()
    blob[40:52, 30:42] = (30, 30, 30)  # black
    detections = EVALUATOR.detect(blob)
    assert Counter((d.color, d.shape) for d in detections) == {(None, "square"): 1, ("red", "circle"): 1}
    assert not EVALUATOR.prompt_accuracy(blob, "a red circle")
    bar = pixels.copy()
    bar[40:44, 10:50] = COLORS["green"]  # a 4×40 bar: green, no shape
    assert [(d.color, d.shape) for d in EVALUATOR.detect(bar) if d.color == "green"] == [("green", None)]
    assert not EVALUATOR.prompt_accuracy(bar, "a red circle")
    speck = pixels.copy()
    speck[50:53, 50:53] = COLORS["blue"]  # 9 pixels: noise
    assert EVALUATOR.prompt_accuracy(speck, "a red circle")


def test_dsg_questions_have_dependencies_on_earlier_entity_questions():
    def brief(rows):
        return [(r["question_id"], r["question"], r["parents"], r["category_broad"], r["category_detailed"]) for r in rows]

    assert brief(questions("three red circles")) == [
        (1, "Are there circles?", [], "entity", "whole"),
        (2, "Are the circles red?", [1], "attribute", "color"),
        (3, "Are there exactly three red circles?", [1, 2], "other", "count"),
    ]
    assert brief(questions("one green square")) == [
        (1, "Is there a square?", [], "entity", "whole"),
        (2, "Is the square green?", [1], "attribute", "color"),
        (3, "Is there exactly one green square?", [1, 2], "other", "count"),
    ]
    assert brief(questions("a green triangle to the left of a yellow square")) == [
        (1, "Is there a triangle?", [], "entity", "whole"),
        (2, "Is the triangle green?", [1], "attribute", "color"),
        (3, "Is there a square?", [], "entity", "whole"),
        (4, "Is the square yellow?", [3], "attribute", "color"),
        (5, "Is the green triangle to the left of the yellow square?", [1, 3], "relation", "spatial"),
    ]
    assert brief(questions("a red circle and two blue circles")) == [
        (1, "Are there circles?", [], "entity", "whole"),
        (2, "Is the circle red?", [1], "attribute", "color"),
        (3, "Are the circles blue?", [1], "attribute", "color"),
        (4, "Are there exactly two blue circles?", [1, 3], "other", "count"),
    ]
    assert brief(questions("four large pink crosses")) == [
        (1, "Are there crosses?", [], "entity", "whole"),
        (2, "Are the crosses pink?", [1], "attribute", "color"),
        (3, "Are the pink crosses large?", [2], "attribute", "size"),
        (4, "Are there exactly four pink crosses?", [1, 2], "other", "count"),
    ]
    assert brief(questions("a small orange diamond above an orange cross")) == [
        (1, "Is there a diamond?", [], "entity", "whole"),
        (2, "Is the diamond orange?", [1], "attribute", "color"),
        (3, "Is the orange diamond small?", [2], "attribute", "size"),
        (4, "Is there a cross?", [], "entity", "whole"),
        (5, "Is the cross orange?", [4], "attribute", "color"),
        (6, "Is the orange diamond above the orange cross?", [1, 4], "relation", "spatial"),
    ]
    for kind in KINDS:
        for scene in sample_scenes(kind, 50, seed=4):
            rows = questions(caption_of(scene))
            assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
            by_id = {r["question_id"]: r for r in rows}
            for row in rows:
                assert all(p < row["question_id"] for p in row["parents"])
                if row["category_detailed"] in ("color", "spatial"):
                    assert {by_id[p]["category_detailed"] for p in row["parents"]} == {"whole"}
                if row["category_detailed"] == "size":
                    assert [by_id[p]["category_detailed"] for p in row["parents"]] == ["color"]
                    assert row["category_broad"] == "attribute"
                assert parse_question(row["question"])[0] == row["category_detailed"]
                assert row["choices"] == ["yes", "no"] and row["answer"] == "yes"
    table = question_table([{"item_id": "w1", "prompt": "three red circles", "source": "world", **r}
                            for r in questions("three red circles")])
    assert table.schema == QUESTION_SCHEMA and table.num_rows == 3


def test_a_wrong_colour_is_a_no_that_zeroes_its_dependents():
    caption = "two red circles and a green square"
    scene = Scene((WorldObject("circle", "blue", 14, 14, 16), WorldObject("circle", "blue", 44, 14, 16),
                   WorldObject("square", "green", 30, 46, 16)),
                  SceneGraph((Entity(2, "blue", "circle"), Entity(1, "green", "square"))))
    rows = questions(caption)
    answers = EVALUATOR.answer(render(scene, supersample=4), caption, rows)
    assert [r["question"] for r in rows] == ["Are there circles?", "Are the circles red?", "Are there exactly two red circles?",
                                             "Is there a square?", "Is the square green?"]
    assert answers == ["yes", "no", "no", "yes", "yes"]
    assert not EVALUATOR.prompt_accuracy(render(scene), caption)
    assert EVALUATOR.dsg_score(render(scene), caption) == pytest.approx(3 / 5)

    # A VQA model that still says "two red circles: yes" scores 0 on it: its colour parent failed.
    claimed = ["yes", "no", "yes", "yes", "yes"]
    scored = score_answers([{**r, "image_id": "i", "correct": float(a == "yes")} for r, a in zip(rows, claimed)])
    assert [r["score"] for r in scored] == [1.0, 0.0, 0.0, 1.0, 1.0]



def test_a_count_question_is_yes_for_exactly_that_many_and_no_for_more_or_fewer():
    def circles(red: int) -> list[Detection]:
        # ``red`` red circles beside a blue circle and a red square, which must not count
        return ([Detection("red", "circle", 100, (8.0 + 12 * i, 10.0), (0, 0, 0, 0), 1.0) for i in range(red)]
                + [Detection("blue", "circle", 100, (30.0, 50.0), (0, 0, 0, 0), 1.0),
                   Detection("red", "square", 100, (50.0, 50.0), (0, 0, 0, 0), 1.0)])

    for asked, word in enumerate(("one", "two", "three", "four", "five", "six"), start=1):
        question = f"Are there exactly {word} red circles?" if asked > 1 else "Is there exactly one red circle?"
        answers = {present: answer_question(circles(present), question) for present in range(MAX_OBJECTS + 1)}
        assert answers == {present: "yes" if present == asked else "no" for present in answers}, question

    # The same through the pixels: three red circles drawn, "two red circles" asked.
    scene = Scene(tuple(WorldObject("circle", "red", x, y, 14) for x, y in ((14, 16), (48, 16), (31, 46))),
                  SceneGraph((Entity(3, "red", "circle"),)))
    image = render(scene, supersample=4)
    rows = questions("two red circles")
    assert [r["question"] for r in rows] == ["Are there circles?", "Are the circles red?",
                                             "Are there exactly two red circles?"]
    assert EVALUATOR.answer(image, "two red circles", rows) == ["yes", "yes", "no"]
    assert EVALUATOR.dsg_score(image, "two red circles") == pytest.approx(2 / 3)
    assert not EVALUATOR.prompt_accuracy(image, "two red circles")
    assert EVALUATOR.prompt_accuracy(image, "three red circles") and EVALUATOR.dsg_score(image, "three red circles") == 1.0
    asked = ["Is there exactly one red circle?", "Are there exactly two red circles?",
             "Are there exactly three red circles?", "Are there exactly four red circles?"]
    assert WorldVQA().answer([image] * 4, asked) == ["no", "no", "yes", "no"]

def test_the_answerer_refuses_questions_from_elsewhere():
    with pytest.raises(WorldQuestionError):
        EVALUATOR.answer(render(sample_scene("single", 0)), None, ["Is the dog sleeping?"])
    with pytest.raises(WorldCaptionError):
        questions("two dogs on a sofa")


def test_the_vqa_backend_and_the_scorer_for_selma_eval():
    scenes = sample_scenes("spatial", 4, seed=12)
    prompts = [{"item_id": f"w{i}", "prompt": caption_of(s), "source": "world"} for i, s in enumerate(scenes)]
    rows = question_rows(prompts)
    assert question_table(rows).num_rows == len(rows) == sum(len(questions(p["prompt"])) for p in prompts)
    images = {p["item_id"]: render_image(s, supersample=4) for p, s in zip(prompts, scenes)}
    vqa = WorldVQA()
    pairs = [(images[r["item_id"]], r["question"]) for r in rows]
    assert vqa.answer([i for i, _ in pairs], [q for _, q in pairs]) == ["yes"] * len(rows)
    wrong = images["w0"]
    answers = vqa.answer([wrong] * len(rows), [r["question"] for r in rows])
    assert answers == [EVALUATOR.answer(wrong, None, [r])[0] for r in rows] and "no" in answers
    assert vqa.yes_probability([wrong] * 2, [rows[0]["question"], "Is there a triangle?"])[0] == 1.0
    scorer = WorldAccuracyScorer()
    assert scorer.score(list(images.values()), [p["prompt"] for p in prompts]) == [1.0] * 4
    assert scorer.score([images["w1"]], [prompts[0]["prompt"]]) == [float(EVALUATOR.prompt_accuracy(_truth(scenes[1]), prompts[0]["prompt"]))]
