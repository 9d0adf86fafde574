"""``selma eval`` end to end on 20 DSG-1K prompts with tiny models: the base model and a LoRA,
a tiny random VLM answering on two actors, CLIPScore from a tiny CLIP, and the report."""

import io
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selma.config import load_config
from selma.core.rundir import RunDir
from selma.eval.questions import score_answers, summarize

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from lora_helpers import write_random_lora  # noqa: E402
from shared_data import BENCHMARKS, needs_benchmarks  # noqa: E402

pytestmark = [pytest.mark.slow, needs_benchmarks]


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    from selma.pipeline import run_eval

    root = tmp_path_factory.mktemp("eval")
    lora = write_random_lora("tiny:sd", root / "adapter")
    config = load_config("tiny", [
        f"run_dir={root / 'run'}", f"eval.models=[base, '{lora}']", "eval.benchmarks=[dsg]", "eval.limit=20",
        f"eval.dsg_annotations={BENCHMARKS / 'dsg-1k-anns.csv'}", "eval.vqa.model=tiny:vlm", "eval.vqa.resources.workers=2",
        "eval.rewards={clipscore: 'tiny:clip'}", "images.steps=2", "eval.batch_size=8",
    ])
    messages: list[str] = []
    result = run_eval(config, RunDir(config.run_dir), progress=messages.append)
    return config, RunDir(config.run_dir), result, messages


def test_each_model_gets_per_question_scores_and_a_summary_that_recomputes(evaluated):
    config, run, result, _ = evaluated
    assert list(result["models"]) == ["base", "lora-adapter"]
    for model in ("base", "lora-adapter"):
        questions = pq.read_table(run.path("eval", model, "dsg-questions.parquet")).to_pylist()
        assert len({q["item_id"] for q in questions}) == 20
        assert len(questions) == sum(1 for _ in questions) and len(questions) >= 20
        assert all(q["correct"] in (0.0, 1.0) and q["score"] <= q["correct"] for q in questions)
        assert all(q["chosen"] in ("yes", "no") and isinstance(q["vqa_answer"], str) for q in questions)
        summary = run.read_json(f"eval/{model}/summary.json")["benchmarks"]["dsg"]
        recomputed = summarize(score_answers([{k: v for k, v in q.items() if k != "score"} for q in questions]))
        assert summary["overall"] == pytest.approx(recomputed["overall"])
        assert summary["overall"]["items"] == 20 and summary["images"] == 20
        assert set(summary["per_source"]) == {q["source"] for q in questions}
        images = pq.read_table(run.path("eval", model, "dsg-images.parquet")).to_pylist()
        assert len(images) == 20 and all(isinstance(i["reward_clipscore"], float) for i in images)
        assert summary["rewards"]["clipscore"] == pytest.approx(sum(i["reward_clipscore"] for i in images) / 20)


def test_models_draw_from_the_same_seeds_and_the_lora_changes_the_images(evaluated):
    _, run, _, _ = evaluated
    base = {r["image_id"]: r for r in run.read_table("eval", "base", "images", "dsg").to_pylist()}
    lora = {r["image_id"]: r for r in run.read_table("eval", "lora-adapter", "images", "dsg").to_pylist()}
    assert set(base) == set(lora) and len(base) == 20
    assert all(base[i]["seed"] == lora[i]["seed"] and base[i]["prompt"] == lora[i]["prompt"] for i in base)
    assert sum(base[i]["image"]["bytes"] != lora[i]["image"]["bytes"] for i in base) == 20


def test_the_report_compares_the_models(evaluated):
    from PIL import Image

    _, run, _, _ = evaluated
    report = run.read_bytes("eval/report.md").decode()
    assert "| base |" in report and "| lora-adapter |" in report and "DSG-1K item mean" in report
    assert "## DSG-1K by source" in report and "clipscore" in report
    chart = Image.open(io.BytesIO(run.read_bytes("eval/report.png")))
    assert chart.format == "PNG" and chart.size[0] > 200
    assert set(run.read_json("eval/summary.json")) == {"base", "lora-adapter"}


def test_a_rerun_draws_and_answers_nothing_again(evaluated):
    from selma.pipeline import run_eval

    config, run, _, _ = evaluated
    messages: list[str] = []
    run_eval(config, run, progress=messages.append)
    assert not any("drawing" in m for m in messages)
    assert sum("answers up to date" in m for m in messages) == 2


def test_tifa_questions_in_the_release_format_scored_with_vqascore(ray_local, tmp_path):
    import json

    from selma.eval.tifa import load_tifa_prompts
    from selma.pipeline import run_eval

    prompts = {p["item_id"]: p["prompt"] for p in load_tifa_prompts(BENCHMARKS / "tifa_v1.0_text_inputs.json")}
    qa = [
        {"id": "coco_301091", "caption": prompts["coco_301091"], "question": "is this a surfer?",
         "choices": ["yes", "no"], "answer": "yes", "answer_type": "animal/human", "element": "surfer"},
        {"id": "coco_301091", "caption": prompts["coco_301091"], "question": "what color is the board?",
         "choices": ["white", "red", "blue"], "answer": "white", "answer_type": "color", "element": "white"},
        {"id": "coco_421933", "caption": prompts["coco_421933"], "question": "what animal is in the air?",
         "choices": ["horse", "dog", "bird", "cow"], "answer": "horse", "answer_type": "animal/human", "element": "horse"},
    ]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    config = load_config("tiny", [
        f"run_dir={tmp_path / 'run'}", "eval.models=[base]", "eval.benchmarks=[tifa]",
        f"eval.tifa_prompts={BENCHMARKS / 'tifa_v1.0_text_inputs.json'}", f"eval.tifa_questions={tmp_path / 'qa.json'}",
        "eval.answer_encoder=tiny:sbert", "eval.vqa.backend=vqascore", "eval.vqa.model=tiny:vlm", "images.steps=2"])
    run_eval(config, RunDir(config.run_dir), progress=lambda _: None)
    rows = pq.read_table(Path(config.run_dir) / "eval" / "base" / "tifa-questions.parquet").to_pylist()
    assert [(r["item_id"], r["question_id"]) for r in rows] == [("coco_301091", 1), ("coco_301091", 2), ("coco_421933", 1)]
    for row in rows:
        assert row["chosen"] in row["choices"] and row["vqa_answer"] == row["chosen"]
        assert 0.0 <= row["yes_probability"] <= 1.0
        assert row["correct"] == float(row["chosen"] == row["answer"]) and row["score"] == row["correct"]
    summary = RunDir(config.run_dir).read_json("eval/base/summary.json")["benchmarks"]["tifa"]
    assert set(summary["per_category_broad"]) == {"animal/human", "color"}
    assert "item_mean_no_dependencies" not in summary["overall"]  # TIFA has no dependency graph
