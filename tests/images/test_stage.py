import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from selma.config import load_config
from selma.pipeline import run_stages
from selma.rundir import RunDir

pytestmark = pytest.mark.slow
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


def test_same_config_reproduces_the_same_images(ray_local, tmp_path):
    for name in ("a", "b"):
        run_stages(_config(tmp_path / name), ("prompts", "images"))
    a, b = (_images(tmp_path / n).sort_by("image_id") for n in ("a", "b"))
    assert a.num_rows == 6
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    assert a.column("image").to_pylist() == b.column("image").to_pylist()


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


def test_too_many_failures_stop_the_stage(ray_local, tmp_path):
    config = _config(tmp_path / "run", "images.max_error_rate=0.0")
    run_stages(config, ("prompts",))
    run = RunDir(str(tmp_path / "run"))
    _add_prompt(run, "feedfacefeedface", " ".join(["pear"] * 300))
    with pytest.raises(RuntimeError, match="max_error_rate"):
        run_stages(config, ("images",))
    assert run.stage("images")["status"] == "running"


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
    from selma.images.stage import image_id

    expected = {image_id(p["prompt_id"], 0) for p in prompts if p["origin"] == "llm"}
    assert len(ids) == len(set(ids)) == 24
    assert set(ids) == expected


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
