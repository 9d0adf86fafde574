import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from selma.config import load_config
from selma.core.ids import derived_seed, image_id, image_seed
from selma.core.rundir import RunDir
from selma.images.stage import _image_plan, planned_images
from selma.pipeline import run_stages

SKILLS = "[coco, whoops]"


def _config(run_dir: Path, *extra: str):
    return load_config("tiny", ["prompts.per_skill=3", f"skills.names={SKILLS}", "images.steps=2",
                                f"run_dir={run_dir}", *extra])


def _images(run_dir: Path) -> pa.Table:
    return RunDir(str(run_dir)).read_table("images")


def _add_prompt(run: RunDir, prompt_id: str, text: str) -> None:
    from selma.prompts.loop import PromptRow
    from selma.prompts.stage import rows_to_table

    run.write_table("prompts/coco/round-09999.parquet",
                    rows_to_table([PromptRow(prompt_id, "coco", text, "llm", "test", 9999)]))


@pytest.mark.slow
def test_same_config_reproduces_the_same_images(ray_local, tmp_path):
    for name in ("a", "b"):
        run_stages(_config(tmp_path / name), ("prompts", "images"))
    a, b = (_images(tmp_path / n).sort_by("image_id") for n in ("a", "b"))
    assert a.num_rows == 6
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    assert a.column("image").to_pylist() == b.column("image").to_pylist()


@pytest.mark.slow
def test_a_failing_prompt_is_recorded_and_the_stage_goes_on(ray_local, tmp_path):
    config = _config(tmp_path / "run", "images.max_error_rate=0.5")
    run_stages(config, ("prompts",))
    run = RunDir(str(tmp_path / "run"))
    too_long = " ".join(["tomato"] * 300)
    _add_prompt(run, "deadbeefdeadbeef", too_long)
    summary = run_stages(config, ("images",))
    errors = run.read_table("errors", "images").to_pylist()
    assert [e["prompt_id"] for e in errors] == ["deadbeefdeadbeef"]
    assert "tokens" in errors[0]["error"]
    assert _images(tmp_path / "run").num_rows == 6
    assert summary["images"] == {"coco": 3, "whoops": 3}


@pytest.mark.slow
def test_too_many_failures_stop_the_stage(ray_local, tmp_path):
    config = _config(tmp_path / "run", "images.max_error_rate=0.0")
    run_stages(config, ("prompts",))
    run = RunDir(str(tmp_path / "run"))
    _add_prompt(run, "feedfacefeedface", " ".join(["pear"] * 300))
    with pytest.raises(RuntimeError, match="max_error_rate"):
        run_stages(config, ("images",))
    entry = run.stage("images")
    assert entry["status"] == "failed" and "max_error_rate" in entry["error"]


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_gives_exactly_the_expected_images(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "tiny", "--run-dir", str(run_dir), "prompts.per_skill=12", f"skills.names={SKILLS}",
            "images.steps=6", "images.batch_size=2"]
    subprocess.run([sys.executable, "-m", "selma", "prompts", *args], check=True, capture_output=True, timeout=120)
    driver = subprocess.Popen([sys.executable, "-m", "selma", "images", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((run_dir / "images").glob("*/*.parquet")):
        assert driver.poll() is None and time.time() < deadline, "the stage ended before it could be killed"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    partial = _images(run_dir).num_rows
    assert 0 < partial < 24
    result = subprocess.run([sys.executable, "-m", "selma", "images", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{partial} images already written" in result.stdout
    ids = _images(run_dir).column("image_id").to_pylist()
    prompts = RunDir(str(run_dir)).read_table("prompts").to_pylist()
    expected = {image_id(p["prompt_id"], 0) for p in prompts if p["origin"] == "llm"}
    assert len(ids) == len(set(ids)) == 24
    assert set(ids) == expected


@pytest.mark.slow
def test_exports_load_with_hugging_face_datasets(ray_local, tmp_path):
    import datasets
    from PIL import Image

    config = _config(tmp_path / "run")
    run_stages(config, ("prompts", "images"))
    shards = sorted(str(p) for p in (tmp_path / "run" / "images").glob("*/*.parquet"))
    parquet = datasets.load_dataset("parquet", data_files=shards, split="train")
    assert len(parquet) == 6
    assert isinstance(parquet[0]["image"], Image.Image) and parquet[0]["image"].size == (64, 64)
    card = (tmp_path / "run" / "images" / "README.md").read_text()
    assert card.startswith("---\n") and "num_examples: 6" in card and "tiny:sd" in card

    out = tmp_path / "folder"
    result = subprocess.run([sys.executable, "-m", "selma", "export", "imagefolder", str(tmp_path / "run"), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(folder) == 6
    assert sorted(folder["text"]) == sorted(parquet["prompt"])
    assert folder[0]["image"].size == (64, 64)


# ----------------------------------------------------------------------------------------- fast (no Ray)


def _prompt_table(count: int) -> pa.Table:
    from selma.core.ids import prompt_id
    from selma.prompts.loop import PromptRow
    from selma.prompts.stage import rows_to_table

    texts = [f"a photo of {n} red kites over a quiet beach" for n in ("one", "two", "three", "four", "five")][:count]
    return rows_to_table([PromptRow(prompt_id("coco", t), "coco", t, "llm", "test", 1) for t in texts])


def test_an_image_seed_is_a_deterministic_function_of_image_id_and_images_seed():
    ids = [image_id("0123456789abcdef", index) for index in range(4)] + [image_id("fedcba9876543210", 0)]
    assert len(set(ids)) == 5
    seeds = [image_seed(7, identifier) for identifier in ids]
    assert len(set(seeds)) == 5, "images with different image_ids must get different seeds"
    assert seeds == [image_seed(7, identifier) for identifier in ids]  # deterministic
    assert seeds == [derived_seed(7, identifier) % 2**63 for identifier in ids]
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert all(image_seed(8, identifier) != seed for identifier, seed in zip(ids, seeds))  # images.seed counts


def test_planned_rows_get_their_image_ids_seed_and_differ_across_image_ids():
    prompts = _prompt_table(3)
    plan = planned_images(prompts, images_per_prompt=2, base_seed=5)
    rows = plan.to_pylist()
    assert plan.schema.field("seed").type == pa.int64() and len(rows) == 6
    assert [r["image_id"] for r in rows] == [image_id(p, i) for p in prompts.column("prompt_id").to_pylist()
                                             for i in range(2)]
    assert [r["seed"] for r in rows] == [image_seed(5, r["image_id"]) for r in rows]
    assert len({r["seed"] for r in rows}) == 6  # two images of one prompt differ too
    again = planned_images(prompts, images_per_prompt=2, base_seed=5)
    assert again.equals(plan)
    other = planned_images(prompts, images_per_prompt=2, base_seed=6).to_pylist()
    assert [r["image_id"] for r in other] == [r["image_id"] for r in rows]
    assert all(a["seed"] != b["seed"] for a, b in zip(other, rows))


def test_the_stage_plan_seeds_each_image_from_its_image_id(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_table("prompts/coco/round-00001.parquet", _prompt_table(4))
    config = load_config("tiny", ["skills.names=[coco]", "images.images_per_prompt=2", "images.seed=11",
                                  f"run_dir={tmp_path / 'run'}"])
    plan, done, todo = _image_plan(config, run)
    rows = plan.to_pylist()
    assert len(rows) == 8 and not done and todo.num_rows == 8
    assert len({r["image_id"] for r in rows}) == len({r["seed"] for r in rows}) == 8
    assert all(r["seed"] == image_seed(11, r["image_id"]) for r in rows)
    reseeded = _image_plan(load_config("tiny", ["skills.names=[coco]", "images.images_per_prompt=2", "images.seed=12",
                                                f"run_dir={tmp_path / 'run'}"]), run)[0].to_pylist()
    assert [r["image_id"] for r in reseeded] == [r["image_id"] for r in rows]
    assert all(a["seed"] != b["seed"] for a, b in zip(reseeded, rows))
