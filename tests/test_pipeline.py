"""selma.pipeline: what a command may and may not do to a run directory. Ray-free: the runs are
built in a known state through the RunDir API, and the commands refused before any Ray work."""

from __future__ import annotations

import json

from run_helpers import SKILLS_OVERRIDE, committed_run, selma, snapshot


def test_a_refused_command_leaves_run_json_byte_identical(tmp_path):
    run = tmp_path / "run"
    committed_run(run, ("prompts", "images"))
    before = snapshot(run)
    result = selma("images", "--run-dir", run, SKILLS_OVERRIDE, "images.steps=5", "model=tiny:sdxl")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("selma: ") and "stage 'images'" in result.stderr
    assert "different config" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(run) == before


def test_a_later_stage_made_under_another_config_refuses_before_earlier_stages_run(tmp_path):
    from selma.core.rundir import RunDir, RunDirError
    from selma.pipeline import plan_stages

    run = tmp_path / "run"
    committed_run(run, ("prompts", "images", "train"))
    before = snapshot(run)
    result = selma("run", "--run-dir", run, SKILLS_OVERRIDE, "train.max_steps=13")
    assert result.returncode == 2 and "stage 'train'" in result.stderr, result.stderr
    assert snapshot(run) == before
    config = committed_run(tmp_path / "other", ("prompts", "images"))
    assert [s.name for s in plan_stages(config, RunDir(str(tmp_path / "other")), ("prompts", "images", "train", "merge"))] == [
        "train", "merge"]
    try:
        plan_stages(config, RunDir(str(tmp_path / "other")), ("merge",))
    except RunDirError as err:
        assert "needs stage 'train'" in str(err)
    else:
        raise AssertionError("merge without train was planned")


def test_merge_without_a_train_stage_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    result = selma("merge", "--run-dir", missing)
    assert result.returncode == 2
    assert result.stderr.startswith("selma: ") and "needs stage 'train'" in result.stderr
    assert not missing.exists()


def test_a_failing_stage_is_marked_failed_with_its_reason_and_a_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    committed_run(run, ("prompts", "images", "train"), experts=True)
    good = (run / "experts" / "whoops" / "pytorch_lora_weights.safetensors").read_bytes()
    (run / "experts" / "whoops" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")

    result = selma("merge", "--run-dir", run, SKILLS_OVERRIDE)
    assert result.returncode == 2, result.stderr
    assert "whoops" in result.stderr and "Traceback" not in result.stderr
    merge = json.loads((run / "run.json").read_text())["stages"]["merge"]
    assert merge["status"] == "failed" and "whoops" in merge["error"]
    assert not (run / "merged").exists()
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]

    (run / "experts" / "whoops" / "pytorch_lora_weights.safetensors").write_bytes(good)
    result = selma("merge", "--run-dir", run, SKILLS_OVERRIDE)
    assert result.returncode == 0, result.stderr
    merge = json.loads((run / "run.json").read_text())["stages"]["merge"]
    assert merge["status"] == "committed" and merge["attempts"] == 2
    assert (run / "merged" / "pytorch_lora_weights.safetensors").is_file()
