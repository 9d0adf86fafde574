"""The shapes-world experiment: its derived training sets, its statistics, and a reduced run of
every arm through the real stages on the shipped base model."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.core.rundir import RunDir
from selma.experiments.world import (
    ARM_TITLES,
    ARMS,
    _with_overrides,
    accuracy_by_kind,
    check_experiment,
    earlier_recipe_rows,
    filtered_images,
    ground_truth_images,
    markdown_calibration,
    markdown_experiment,
    verified_images,
)
from selma.images.export import png_bytes_of, with_hf_features
from selma.images.generator import png_bytes
from selma.images.stage import planned_images
from selma.world import Scene, WorldEvaluator, WorldObject, caption_of, parse_caption, render, sample_scenes, split_of

EVALUATOR = WorldEvaluator()


def images_table(scenes, prompts):
    n = len(scenes)
    table = pa.table({
        "image_id": [f"img{i}" for i in range(n)], "prompt_id": [f"p{i}" for i in range(n)],
        "skill": ["world_counting"] * n, "prompt": prompts, "seed": list(range(100, 100 + n)),
        "image": [png_bytes(render(s) / 255.0) for s in scenes], "width": [64] * n, "height": [64] * n,
        "model": ["m"] * n, "steps": [20] * n, "guidance_scale": [4.0] * n})
    return with_hf_features(table)


def decoded(table):
    return [np.asarray(Image.open(io.BytesIO(png_bytes_of(image))).convert("RGB"))
            for image in table.column("image").to_pylist()]


def test_filtering_keeps_exactly_the_images_the_evaluator_accepts():
    scenes = sample_scenes("counting", 6, seed=1) + sample_scenes("binding", 6, seed=1)
    prompts = [caption_of(s) for s in scenes]
    wrong = prompts[:6][1:] + prompts[:1] + prompts[6:]  # the first six images get another count's caption
    kept = filtered_images(images_table(scenes, wrong))
    expected = [i for i in range(12) if EVALUATOR.prompt_accuracy(render(scenes[i]), wrong[i])]
    assert kept.column("image_id").to_pylist() == [f"img{i}" for i in expected]
    assert set(range(6, 12)) <= set(expected) and len(expected) < 12
    assert kept.schema == images_table(scenes, wrong).schema


def test_ground_truth_images_render_each_prompt_with_the_image_stages_ids_and_seeds():
    prompts = [caption_of(s) for s in sample_scenes("spatial", 4, seed=2)]
    table = pa.table({"prompt_id": [f"p{i}" for i in range(4)], "skill": ["world_spatial"] * 4, "prompt": prompts})
    truth = ground_truth_images(table, 3, seed=7)
    plan = planned_images(table, 3, 7)
    assert truth.num_rows == 12
    for column in ("image_id", "prompt_id", "skill", "prompt", "seed"):
        assert truth.column(column).to_pylist() == plan.column(column).to_pylist()
    assert set(truth.column("model").to_pylist()) == {"selma.world.render"}
    assert all(EVALUATOR.prompt_accuracy(image, prompt)
               for image, prompt in zip(decoded(truth), truth.column("prompt").to_pylist()))
    images = decoded(truth)
    assert not np.array_equal(images[0], images[1])  # another seed, another layout of the same prompt
    assert all(np.array_equal(a, b) for a, b in zip(images, decoded(ground_truth_images(table, 3, seed=7))))
    assert truth.schema.field("image").type == images_table(sample_scenes("single", 1), ["a red circle"]).schema.field(
        "image").type


def test_the_verifier_keeps_what_the_vqa_backend_says_yes_to_which_misses_extra_objects():
    """The verifier arm asks the run's VQA backend the prompt's DSG questions; DSG asks nothing
    about objects the prompt does not name, so an image with an extra object passes the verifier
    but not the exact filter."""
    exact = sample_scenes("counting", 1, seed=5)[0]
    graph = parse_caption("two red circles")
    crowded = Scene((WorldObject("circle", "red", 12, 12, 12), WorldObject("circle", "red", 40, 12, 12),
                     WorldObject("square", "blue", 26, 44, 12)), graph)
    wrong = Scene((WorldObject("circle", "red", 12, 12, 12),), graph)
    prompts = [caption_of(exact), "two red circles", "two red circles"]
    table = images_table([exact, crowded, wrong], prompts)
    config = load_config("world")
    assert verified_images(table, config).column("image_id").to_pylist() == ["img0", "img1"]
    assert filtered_images(table).column("image_id").to_pylist() == ["img0"]


def test_a_calibration_recipe_may_not_change_the_model_or_the_evaluation():
    config = load_config("world")
    assert _with_overrides(config, ["train.rank=32", "prompts.per_skill=100"]).train.rank == 32
    for bad in ("eval.images_per_prompt=1", "model=tiny:sd", "images.model=world:small"):
        with pytest.raises(ConfigError, match="a recipe sets train"):
            _with_overrides(config, [bad])


def test_world_skills_refuse_held_out_captions_in_the_prompt_loop():
    from selma.prompts.loop import Completion, SkillLoop
    from selma.skills import load_registry

    config = load_config("world")
    skill = load_registry()["world_counting"]
    test_caption = next(caption_of(s) for s in sample_scenes("counting", 1, seed=0, split="test"))
    train_caption = next(caption_of(s) for s in sample_scenes("counting", 30, seed=0, split="train")
                         if caption_of(s) not in skill.seeds)
    loop = SkillLoop(skill, skill.seeds, [], config.prompts, "test")
    requests = loop.requests(loop.next_unrequested_round)
    text = f"1. {test_caption}\n2. {train_caption}\n3. a purple hexagon"
    loop.add([Completion(request.round, request.index, text if i == 0 else "") for i, request in enumerate(requests)])
    assert [p for p in loop.pool if p not in skill.seeds] == [train_caption]
    assert loop.stats.rejected_by_skill == 2
    assert split_of(test_caption) == "test"


def test_a_skill_whose_accept_cannot_be_imported_fails_the_config(tmp_path):
    skill = tmp_path / "odd.yaml"
    skill.write_text("name: odd\ndescription: d\nseeds: [a, b, c]\naccept: selma.world:no_such_function\n")
    with pytest.raises(ConfigError, match="skills.names: skill 'odd': accept"):
        load_config("tiny", [f"skills.files=[{skill}]", "skills.names=[odd]"])


def test_the_experiment_checks_its_arms_skills_and_scorer_before_any_work():
    config = load_config("world")
    check_experiment(config, ARMS)
    with pytest.raises(ConfigError, match="unknown arm"):
        check_experiment(config, ("base", "lora"))
    with pytest.raises(ConfigError, match="skills.names"):
        check_experiment(load_config("world", ["skills.names=[world_objects]"]), ARMS)
    with pytest.raises(ConfigError, match="eval.vqa.backend"):
        check_experiment(load_config("world", ["eval.vqa.backend=transformers"]), ARMS)


def test_accuracy_is_averaged_per_prompt_with_its_standard_error(tmp_path):
    run = RunDir(str(tmp_path))
    # Two seeds per prompt: prompt means 1, 0.5, 0, 0.5 -> mean 0.5, s.e. sqrt(1/6 / 4).
    accuracy = [1, 1, 1, 0, 0, 0, 0, 1] + [1, 0]
    items = ["counting_0"] * 2 + ["counting_1"] * 2 + ["counting_2"] * 2 + ["counting_3"] * 2 + ["spatial_0"] * 2
    run.write_table("eval/base/world-images.parquet", pa.table({
        "image_id": [str(i) for i in range(10)], "item_id": items, "prompt": ["p"] * 10,
        "reward_prompt_accuracy": [float(a) for a in accuracy], "score": [float(a) for a in accuracy]}))
    result = accuracy_by_kind(run, "base")
    assert result["counting"]["accuracy"] == 0.5 and result["counting"]["prompts"] == 4
    assert math.isclose(result["counting"]["stderr"], math.sqrt((0.25 + 0 + 0.25 + 0) / 3 / 4))
    assert result["spatial"] == {"accuracy": 0.5, "stderr": 0.0, "dsg": 0.5, "prompts": 1, "images": 2}
    # A second training seed's images pool into each prompt's mean.
    run.write_table("eval/other/world-images.parquet", pa.table({
        "image_id": ["a", "b"], "item_id": ["counting_2", "counting_2"], "prompt": ["p"] * 2,
        "reward_prompt_accuracy": [1.0, 1.0], "score": [1.0, 1.0]}))
    pooled = accuracy_by_kind(run, ["base", "other"])
    assert pooled["counting"]["accuracy"] == (1 + 0.5 + 0.5 + 0.5) / 4 and pooled["counting"]["images"] == 10
    assert pooled["counting"]["runs"] == 2


def test_the_report_table_has_a_row_per_arm_and_the_change_from_base():
    config = load_config("world").model_dump(mode="json")
    cell = lambda a: {"accuracy": a, "stderr": 0.01, "dsg": a, "prompts": 300, "images": 600}  # noqa: E731
    data = {"record": {"config": config, "arms": list(ARMS), "seconds": {"eval": 60}, "machine": {"cpus": 2},
                       "training_images": {"selma": {"world_counting": 320}, "filtered": {"world_counting": 70}}},
            "kinds": ["counting", "binding", "spatial"],
            "results": {"base": {"counting": cell(0.2)}, "experts": {"counting": cell(0.25)}}}
    text = markdown_experiment(data)
    assert "| base model | 20.0 ± 1.0 | - | - |" in text
    assert "| SELMA expert (own skill) | 25.0 ± 1.0 (+5.0) | - | - |" in text
    assert all(f"| {ARM_TITLES[arm]} |" in text for arm in ARMS)
    assert "| filtered | 70 |" in text and "300 held-out test prompts per skill, 2 seeds each" in text
    data["record"]["truth_seeds"] = [0, 1]
    data["results"]["ground_truth-seed1"] = {"counting": cell(0.4)}
    assert "| &nbsp;&nbsp;training seed 1 | 40.0 ± 1.0 (+20.0) | - | - |" in markdown_experiment(data)


def test_the_calibration_table_says_which_recipes_pass():
    cell = lambda a: {"accuracy": a, "stderr": 0.02, "dsg": a, "prompts": 300, "images": 1200}  # noqa: E731
    record = {"config": load_config("world").model_dump(mode="json"), "truth_seeds": [0, 1],
              "base": {"counting": cell(0.25), "binding": cell(0.3)},
              "recipes": [{"recipe": "big", "overrides": ["train.rank=32"], "seconds_to_train": 120, "passes": True,
                           "kinds": {"counting": {"ground_truth": cell(0.4), "gain": 0.15,
                                                  "seeds": {0: cell(0.38), 1: cell(0.42)}}}}]}
    text = markdown_calibration(record)
    assert "| base model | 25.0 ± 2.0 | 30.0 ± 2.0 |" in text
    assert "| big | 40.0 ± 2.0 (+15.0) [38.0; 42.0] | - | yes | 2.0 | `train.rank=32` |" in text
    record["base"]["spatial"] = cell(0.05)
    assert "The base model on the other kinds: spatial 5.0 ± 2.0." in markdown_calibration(record)


def test_calibrating_one_recipe_keeps_the_rows_of_recipes_calibrated_earlier_in_the_folder(tmp_path):
    row = lambda name, gain: {"recipe": name, "overrides": [], "kinds": {"counting": {"gain": gain}}}  # noqa: E731
    record_file = tmp_path / "calibration.json"
    assert earlier_recipe_rows(record_file, [row("a", 0.1)]) == [row("a", 0.1)]
    record_file.write_text(json.dumps({"recipes": [row("a", 0.1), row("b", 0.2)]}))
    assert earlier_recipe_rows(record_file, [row("b", 0.3), row("c", 0.0)]) == [row("a", 0.1), row("b", 0.3),
                                                                                   row("c", 0.0)]


@pytest.mark.slow
def test_a_reduced_experiment_runs_through_the_real_stages_on_the_shipped_base_model(ray_local, tmp_path):
    """The mechanics, small: one skill; the base model, the SELMA expert, and an expert on
    ground-truth renders, each trained and scored through the real stages. (The other arms add
    a merge, a joint train stage and a filter, each tested on its own.) The numbers mean nothing
    at this size."""
    from selma.experiments.world import run_experiment

    config = load_config("world", [
        "skills.names=[world_counting]", "prompts.per_skill=4", "images.images_per_prompt=4", "images.steps=4",
        "images.batch_size=16", "images.resources.cpus=1", "eval.resources.cpus=1", "train.max_steps=2",
        "train.batch_size=1", "train.effective_batch_size=1", "train.checkpoint_every=2",
        "eval.world_prompts_per_kind=4", "eval.images_per_prompt=1", "eval.batch_size=4"])
    out = tmp_path / "experiment"
    arms = ("base", "experts", "ground_truth")
    result = run_experiment(config, out, arms, progress=lambda _: None, truth_seeds=(0, 1))
    record = json.loads((out / "experiment.json").read_text())
    assert record["training_images"] == {"selma": {"world_counting": 16}, "ground_truth": {"world_counting": 16}}
    assert set(result["results"]) == set(arms) | {"ground_truth-seed0", "ground_truth-seed1"}
    for arm in ("base", "experts", "ground_truth-seed0", "ground_truth-seed1"):
        assert result["results"][arm]["counting"]["images"] == 4
    assert result["results"]["ground_truth"]["counting"]["images"] == 8  # both seeds' experts, pooled
    seeds = [RunDir(str(out / f"ground_truth-seed{s}")).read_json("run.json")["config"]["train"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    report = (out / "report.md").read_text()
    assert "| expert on ground-truth renders |" in report and (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    eval_report = RunDir(str(out / "selma")).read_bytes("eval/report.md").decode()
    assert "prompt_accuracy (shapes world)" in eval_report and "expert-world_counting" in eval_report
    truth = RunDir(str(out / "ground_truth-seed0")).read_table("images")
    assert all(EVALUATOR.prompt_accuracy(image, prompt)
               for image, prompt in zip(decoded(truth), truth.column("prompt").to_pylist()))
    # A rerun trains and draws nothing again.
    before = {p: p.stat().st_mtime for p in out.rglob("*.safetensors")}
    run_experiment(config, out, arms, progress=lambda _: None)
    assert {p: p.stat().st_mtime for p in out.rglob("*.safetensors")} == before


def test_an_unknown_weak_model_fails_before_any_work(tmp_path):
    from selma.experiments.world import run_experiment

    with pytest.raises(ConfigError, match="--weak-model: unknown shapes-world model 'world:huge'"):
        run_experiment(load_config("world"), tmp_path / "out", ("base", "weak_to_strong"), weak_model="world:huge")
    assert not (tmp_path / "out").exists()
