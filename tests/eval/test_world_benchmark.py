"""The shapes world inside `selma eval`: held-out captions as a benchmark, the exact evaluator as
the VQA backend, prompt accuracy as the primary metric."""

import io

import pyarrow as pa

from selma.config import load_config
from selma.eval.questions import score_answers, summarize
from selma.eval.run import AnswerImages, world_question_rows


def world_batch(scenes, captions_of_images):
    from PIL import Image

    from selma.world import render

    images = []
    for scene in scenes:
        buffer = io.BytesIO()
        Image.fromarray(render(scene, supersample=4)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    ids = [f"item_{i}" for i in range(len(scenes))]
    return pa.table({"image_id": ids, "prompt_id": ids, "prompt": captions_of_images, "image": images})


def answered(config, scenes, captions):
    from selma.world import question_rows

    rows = question_rows([{"item_id": f"item_{i}", "prompt": c, "source": "w"} for i, c in enumerate(captions)])
    by_item: dict[str, list[dict]] = {}
    for row in rows:
        by_item.setdefault(row["item_id"], []).append(row)
    out = AnswerImages(config.eval, by_item, benchmark="world")(world_batch(scenes, captions)).to_pylist()
    flat = [{**q, "image_id": r["image_id"], "correct": c}
            for r in out for q, c in zip(by_item[r["image_id"]], r["correct"])]
    return out, summarize(score_answers(flat))


def test_ground_truth_renders_score_perfectly_and_mismatched_captions_do_not():
    from selma.world import caption_of, sample_scenes

    config = load_config("tiny", ["eval.vqa.backend=world", "eval.rewards={}"])
    scenes = [s for kind in ("counting", "binding", "spatial") for s in sample_scenes(kind, 8, seed=3, split="test")]
    captions = [caption_of(s) for s in scenes]
    out, summary = answered(config, scenes, captions)
    assert [r["reward_prompt_accuracy"] for r in out] == [1.0] * len(scenes)
    assert summary["overall"]["item_mean"] == 1.0
    shifted = captions[1:] + captions[:1]
    out, summary = answered(config, scenes, shifted)
    assert sum(r["reward_prompt_accuracy"] for r in out) / len(out) <= 0.1
    assert summary["overall"]["item_mean"] < 0.8


def test_held_out_world_captions_never_come_from_the_training_split():
    from selma.world import split_of

    rows = world_question_rows(["counting", "spatial"], 20, seed=0)
    prompts = {r["item_id"]: r["prompt"] for r in rows}
    assert len(prompts) == 40 and all(split_of(p) == "test" for p in prompts.values())
    assert {r["source"] for r in rows} == {"counting", "spatial"}
