"""The shapes world: a faithfulness testbed whose every image can be checked exactly.

64×64 RGB images on a white background hold 1–6 non-overlapping objects: circles, squares,
triangles, diamonds and crosses in red, green, blue, yellow, orange, purple, cyan or pink, small,
large or of either size. Captions follow a small grammar and are parsed back into
the scene graph they state; an exact evaluator finds the objects in an image and answers
DSG-style questions about them.

Scenes and renders (:mod:`selma.world.scene`, :mod:`selma.world.render`)::

    scene = sample_scene("counting", seed=7)        # kinds: single counting binding spatial multi
    pixels = render(scene)                          # 64×64×3 uint8; options: supersample=4
                                                    # (soft edges), corner_radius=0.4, blur=0.8, noise=6
    caption_of(scene)                               # "three red circles"
    sample_scenes("spatial", 100, seed=0, split="test")   # held-out scenes (see split_of)

Captions (:mod:`selma.world.captions`): ``parse_caption(text) -> SceneGraph`` (raises
:class:`WorldCaptionError` outside the grammar), ``format_caption(graph)``, ``is_world_caption``,
``split_of(caption, test_fraction=0.2, salt="") -> "train" | "test"`` (by the caption's concept,
so "A left of B" and "B right of A" fall together).

Evaluation (:mod:`selma.world.evaluator`)::

    evaluator = WorldEvaluator()                    # thresholds: min_area, min_iou, max_aspect, ...
    rows = evaluator.questions(caption)             # QUESTION_SCHEMA rows minus item_id/prompt/source
    evaluator.answer(image, caption, rows)          # ["yes", "no", ...] from the image
    evaluator.prompt_accuracy(image, caption)       # bool: the image is exactly the caption
    evaluator.dsg_score(image, caption)             # mean DSG score with the dependency rule
    evaluator.evaluate(image, caption)              # all of it, with the detections

``WorldVQA`` answers the questions as a VQA backend (the interface of ``selma.eval.vqa.VQABackend``,
from the question text and image alone) and ``WorldAccuracyScorer`` gives prompt accuracy as a reward scorer
(``score(images, prompts)``); ``question_rows(prompts)`` builds a benchmark's question rows.

The base model (:mod:`selma.world.base`): ``train_base_model(out_dir, BaseModelConfig())`` trains
a small Stable Diffusion pipeline on the world from scratch (``selma world train-base``); the one
shipped with selma is the model spec ``world:base``. The experiment (:mod:`selma.experiments.world`):
``run_experiment(load_config("world"), out)`` compares the base model, SELMA experts and merges,
a joint LoRA, experts on evaluator-filtered images and on ground-truth renders
(``selma world experiment``).

Skills: ``SKILL_FILES`` are the YAML files of the world skills (world_objects, world_counting,
world_binding, world_spatial) for ``skills.files``; their template backend output is in the
grammar. Held-out prompts: keep the prompts with ``split_of(p) == "train"`` for training and
sample test prompts with ``sample_scenes(kind, n, seed, split="test")``.
"""

from pathlib import Path

from selma.world.captions import (
                                  WorldCaptionError,
                                  caption_of,
                                  concept_key,
                                  format_caption,
                                  is_training_caption,
                                  is_world_caption,
                                  parse_caption,
                                  sample_scenes,
                                  scene_seed,
                                  split_of,
)
from selma.world.evaluator import (
                                  Detection,
                                  WorldAccuracyScorer,
                                  WorldEvaluator,
                                  WorldQuestionError,
                                  WorldVQA,
                                  answer_question,
                                  detect,
                                  question_rows,
                                  questions,
)
from selma.world.render import render, render_image
from selma.world.scene import (
                                  COLORS,
                                  KINDS,
                                  RELATIONS,
                                  SHAPES,
                                  SKILL_KINDS,
                                  Entity,
                                  Relation,
                                  Scene,
                                  SceneGraph,
                                  WorldObject,
                                  sample_scene,
                                  skill_scene,
)

SKILL_DIR = Path(__file__).resolve().parent.parent / "skills" / "builtin" / "world"
SKILL_FILES = [str(SKILL_DIR / f"{name}.yaml") for name in sorted(SKILL_KINDS)]

__all__ = [
    "COLORS", "KINDS", "RELATIONS", "SHAPES", "SKILL_DIR", "SKILL_FILES", "SKILL_KINDS", "Detection", "Entity",
    "Relation", "Scene", "SceneGraph", "WorldAccuracyScorer", "WorldCaptionError", "WorldEvaluator", "WorldObject",
    "WorldQuestionError", "WorldVQA", "answer_question", "caption_of", "concept_key", "detect", "format_caption",
    "is_training_caption", "is_world_caption", "parse_caption", "question_rows", "questions", "render", "render_image", "sample_scene",
    "sample_scenes", "scene_seed", "skill_scene", "split_of",
]
