"""Intermediate experts without Ray: the LoRA at every checkpoint, written by the train loop's writer
from a real LoraTrainStep on tiny:sd, then listed, exported (plain diffusers loads it) and merged by
``train.select``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import snapshot
from test_step import _batch  # shared helper (pytest puts tests/train on sys.path)

from selma.cli import main
from selma.config import load_config
from selma.core.errors import ConfigError
from selma.core.rundir import RunDir, RunDirError
from selma.merge.lora_io import WEIGHT_NAME, copy_adapter_files, read_lora
from selma.merge.methods import merge_experts
from selma.merge.stage import MergeStage, run_merge_stage
from selma.pipeline import record_config, stage_hashes
from selma.train.checkpoints import write_checkpoint
from selma.train.experts import ExpertJob, _write_expert
from selma.train.step import LoraTrainStep, load_training_components

EXPERTS = ("coco", "whoops")
OVERRIDES = ["skills.names=[coco, whoops]", "train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=2",
             "train.effective_batch_size=2"]


def _train_expert(config, run: RunDir, name: str, seed: int, batch) -> dict[int, dict]:
    """What train_expert_loop does for one expert on one worker: a checkpoint every checkpoint_every
    steps and at the last, then the final expert. Returns each checkpoint's LoRA state."""
    t = config.train
    torch.manual_seed(seed)
    trainer = LoraTrainStep(load_training_components(config.model, t), t, seed=seed)
    states, metrics = {}, []
    while trainer.step < t.max_steps:
        loss, stepped = trainer.train_micro_batch(batch)
        if not stepped:
            continue
        metrics.append({"step": trainer.step, "loss": loss})
        if trainer.step % t.checkpoint_every == 0 or trainer.step == t.max_steps:
            states[trainer.step] = {k: v.clone() for k, v in trainer.lora_state_dict().items()}  # else views
            write_checkpoint(trainer, 0, run_uri=run.uri, expert=name, base_model=config.model, loss=loss)
    _write_expert(ExpertJob.from_config(config, name, run, resolution=64), trainer.lora_state_dict(), metrics)
    return states


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with prompts, images and train committed: two experts trained 4 steps, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("checkpoints") / "run"
    config = load_config("tiny", [*OVERRIDES, f"run_dir={root}"])
    run = RunDir(str(root))
    record_config(run, config)
    batch = _batch(config.model, 2)
    states = {name: _train_expert(config, run, name, seed, batch) for seed, name in enumerate(EXPERTS)}
    for stage in ("prompts", "images", "train"):
        run.begin_stage(stage, stage_hashes(config)[stage])
        run.commit_stage(stage)
    return root, states


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def _peft_factors(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft keys (``<module>.lora_A.weight``) → {module: (A, B)}, as read_lora keys its layers."""
    modules = {key.rsplit(".lora_", 1)[0] for key in state}
    return {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]) for m in modules}


def _assert_holds(folder: Path, state: dict) -> None:
    adapter = read_lora(folder)
    factors = _peft_factors(state)
    assert sorted(adapter.layers) == sorted(factors)
    for name, (A, B) in factors.items():
        assert torch.equal(adapter.layers[name].A, A) and torch.equal(adapter.layers[name].B, B), name


def _checkpoint(root: Path, expert: str, step: int) -> Path:
    return root / "experts" / expert / "checkpoints" / f"step-{step:06d}"


def test_every_checkpoint_holds_the_lora_at_its_step_and_survives_the_final_write(trained):
    root, states = trained
    for expert in EXPERTS:
        folders = sorted(p.name for p in (root / "experts" / expert / "checkpoints").iterdir())
        assert folders == ["step-000002", "step-000004"]
        for step in (2, 4):
            folder = _checkpoint(root, expert, step)
            assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", WEIGHT_NAME, "step.json"]
            recorded = json.loads((folder / "step.json").read_text())
            assert recorded["step"] == step and isinstance(recorded["loss"], float)
            _assert_holds(folder, states[expert][step])
            assert read_lora(folder).metadata == {"skill": expert, "step": str(step)}
        _assert_holds(root / "experts" / expert, states[expert][4])  # the final expert is the last step's
        assert not torch.equal(states[expert][2][next(iter(states[expert][2]))],
                               states[expert][4][next(iter(states[expert][4]))])


def test_a_resumed_run_rewrites_a_step_it_reaches_again_and_rank_1_only_gathers(tmp_path):
    config = load_config("tiny", [*OVERRIDES, "train.learning_rate=1e-3"])
    t, run = config.train, RunDir(str(tmp_path / "run"))
    torch.manual_seed(0)
    first = LoraTrainStep(load_training_components(config.model, t), t, seed=0)
    batch = _batch(config.model, 2)
    while first.step < 2:
        first.train_micro_batch(batch)
    first.save_checkpoint(tmp_path / "resume", rank=0)  # what Ray Train keeps to resume from
    while first.step < 4:
        first.train_micro_batch(batch)
    write_checkpoint(first, 0, run_uri=run.uri, expert="coco", base_model=config.model, loss=0.5)
    before = {k: v.clone() for k, v in first.lora_state_dict().items()}

    torch.manual_seed(1)
    resumed = LoraTrainStep(load_training_components(config.model, t), t, seed=1)
    resumed.load_checkpoint(tmp_path / "resume", rank=0)
    other = _batch(config.model, 4)
    other = {key: value[2:] for key, value in other.items()}  # other images: the step-4 LoRA differs
    while resumed.step < 4:
        resumed.train_micro_batch(other)
    gathered = []
    resumed.lora_state_dict = lambda original=resumed.lora_state_dict: gathered.append(1) or original()
    write_checkpoint(resumed, 1, run_uri=run.uri, expert="coco", base_model=config.model, loss=0.25)
    assert gathered == [1]  # a collective under ZeRO-3: rank 1 takes part, and writes nothing
    _assert_holds(_checkpoint(tmp_path / "run", "coco", 4), before)

    write_checkpoint(resumed, 0, run_uri=run.uri, expert="coco", base_model=config.model, loss=0.25)
    checkpoints = tmp_path / "run" / "experts" / "coco" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]  # replaced, no leftovers
    after = resumed.lora_state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)
    _assert_holds(_checkpoint(tmp_path / "run", "coco", 4), after)
    assert json.loads((_checkpoint(tmp_path / "run", "coco", 4) / "step.json").read_text()) == {"step": 4, "loss": 0.25}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 500, hidden).sample


def test_export_writes_a_folder_plain_diffusers_loads_with_that_steps_weights(trained, tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from selma.core.models import resolve_model

    root, states = trained
    before = snapshot(root)
    code, out, err = _cli(capsys, "experts", "export", root, "--step", "2", "--out", tmp_path / "out")
    assert code == 0, err
    assert snapshot(root) == before
    for expert in EXPERTS:
        folder = tmp_path / "out" / expert
        assert f"{expert}: step 2 → {folder}" in out
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", WEIGHT_NAME]
        assert (folder / WEIGHT_NAME).read_bytes() == (_checkpoint(root, expert, 2) / WEIGHT_NAME).read_bytes()
        card = (folder / "README.md").read_text()
        assert f"# SELMA expert `{expert}` at step 2" in card and "base_model: tiny:sd" in card

    pipe = DiffusionPipeline.from_pretrained(resolve_model("tiny:sd"))
    base = _unet_output(pipe)
    pipe.load_lora_weights(str(tmp_path / "out" / "coco"), adapter_name="step2")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="step2")
    expected = states["coco"][2]
    assert sorted(loaded) == sorted(expected)
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key
    assert not torch.allclose(_unet_output(pipe), base, rtol=0, atol=1e-7), "the LoRA changed nothing"


def test_export_last_and_one_expert(trained, tmp_path, capsys):
    root, states = trained
    code, out, err = _cli(capsys, "experts", "export", root, "--step", "last", "--expert", "whoops",
                          "--out", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["whoops"]
    _assert_holds(tmp_path / "out" / "whoops", states["whoops"][4])
    assert "at step 4" in (tmp_path / "out" / "whoops" / "README.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--step", "3"], "{run}/experts/coco/checkpoints: no checkpoint at step 3; exported steps: 2, 4"),
    (["--step", "2", "--expert", "nobody"], "{run}/experts: no expert nobody; experts: coco, whoops"),
])
def test_export_of_what_the_run_lacks_exits_2_and_writes_nothing(trained, tmp_path, capsys, argv, message):
    root, _ = trained
    code, _, err = _cli(capsys, "experts", "export", root, *argv, "--out", tmp_path / "out")
    assert code == 2
    assert err == f"selma: {message.format(run=root)}\n"
    assert not (tmp_path / "out").exists()


def test_a_bad_step_argument_is_refused_by_the_parser(trained, tmp_path, capsys):
    code, _, err = _cli(capsys, "experts", "export", trained[0], "--step", "six", "--out", tmp_path / "out")
    assert code == 2 and "argument --step: expected a step number or 'last', got 'six'" in err


def _listing_rows(out: str) -> dict[str, list[tuple[str, ...]]]:
    rows, expert = {}, None
    for line in out.splitlines():
        if re.match(r"^\w+ \((not )?finished\)$", line):
            expert = line.split()[0]
            rows[expert] = []
        elif expert and re.match(r"^\s+\d+\s", line):
            rows[expert].append(tuple(line.split()))
    return rows


def test_list_shows_each_step_its_loss_and_what_train_select_picks(run_dir, capsys):
    code, out, err = _cli(capsys, "experts", "list", run_dir)
    assert code == 0, err
    assert "train.select: last" in out
    rows = _listing_rows(out)
    assert list(rows) == list(EXPERTS)
    for expert in EXPERTS:
        losses = {step: json.loads((_checkpoint(run_dir, expert, step) / "step.json").read_text())["loss"]
                  for step in (2, 4)}
        assert rows[expert] == [("2", f"{losses[2]:.4f}"), ("4", f"{losses[4]:.4f}", "*")]
    assert "coco (finished)" in out

    run = RunDir(str(run_dir))
    config = run.manifest()["config"]
    config["train"]["select"] = "step:2"
    run.update_manifest(config=config)
    shutil.rmtree(run_dir / "experts" / "whoops" / "checkpoints" / "step-000004")
    (run_dir / "experts" / "whoops" / WEIGHT_NAME).unlink()  # whoops: still training after step 2
    code, out, err = _cli(capsys, "experts", "list", run_dir)
    assert code == 0, err
    rows = _listing_rows(out)
    assert "train.select: step:2" in out and "whoops (not finished)" in out
    assert [row[0] + (row[2] if len(row) > 2 else "") for row in rows["coco"]] == ["2*", "4"]
    assert [row[0] + (row[2] if len(row) > 2 else "") for row in rows["whoops"]] == ["2*"]


def _assert_same_deltas(one: Path, other: Path) -> None:
    first, second = read_lora(one), read_lora(other)
    assert sorted(first.layers) == sorted(second.layers)
    for name in first.layers:
        assert torch.equal(first.delta(name), second.delta(name)), name


def _differs(one: Path, other: Path) -> bool:
    first, second = read_lora(one), read_lora(other)
    return any(not torch.equal(first.delta(name), second.delta(name)) for name in first.layers)


def test_merge_of_step_n_merges_those_checkpoints_not_the_final_experts(run_dir, tmp_path):
    config = load_config("tiny", [*OVERRIDES, "train.select=step:2"])
    summary = run_merge_stage(config, RunDir(str(run_dir)))
    assert (summary["select"], summary["step"]) == ("step:2", 2)
    merge_experts({e: _checkpoint(run_dir, e, 2) for e in EXPERTS}, tmp_path / "of-step-2")
    merge_experts({e: run_dir / "experts" / e for e in EXPERTS}, tmp_path / "of-finals")
    _assert_same_deltas(run_dir / "merged", tmp_path / "of-step-2")
    assert _differs(run_dir / "merged", tmp_path / "of-finals")
    report = json.loads((run_dir / "merged" / "merge.json").read_text())
    assert (report["select"], report["step"]) == ("step:2", 2)
    assert report["sources"] == {e: str(_checkpoint(run_dir, e, 2)) for e in EXPERTS}

    summary = run_merge_stage(load_config("tiny", OVERRIDES), RunDir(str(run_dir)))
    assert (summary["select"], summary["step"]) == ("last", 4)
    _assert_same_deltas(run_dir / "merged", tmp_path / "of-finals")


def test_merge_of_a_step_a_checkpoint_is_missing_for_names_its_path(run_dir):
    shutil.rmtree(_checkpoint(run_dir, "whoops", 2))
    config = load_config("tiny", [*OVERRIDES, "train.select=step:2"])
    with pytest.raises(RunDirError, match=re.escape(f"{_checkpoint(run_dir, 'whoops', 2)}: no checkpoint at step 2")):
        run_merge_stage(config, RunDir(str(run_dir)))
    assert not (run_dir / "merged").exists()


def test_a_step_no_checkpoint_is_written_at_fails_the_merge_before_any_work(run_dir, capsys):
    MergeStage().preflight(load_config("tiny", [*OVERRIDES, "train.select=step:4"]), RunDir(str(run_dir)))
    with pytest.raises(ConfigError, match=r"^train.select: no checkpoint is written at step 3; .*e\.g\. 2, 4"):
        MergeStage().preflight(load_config("tiny", [*OVERRIDES, "train.select=step:3"]), RunDir(str(run_dir)))
    before = snapshot(run_dir)
    code, _, err = _cli(capsys, "merge", "--run-dir", run_dir, *OVERRIDES, "train.select=step:6")
    assert code == 2 and err.startswith("selma: train.select: no checkpoint is written at step 6"), err
    assert snapshot(run_dir) == before


def test_switching_select_on_a_merged_run_redoes_only_the_merge(run_dir, capsys):
    code, _, err = _cli(capsys, "merge", "--run-dir", run_dir, *OVERRIDES)
    assert code == 0, err
    code, _, err = _cli(capsys, "merge", "--run-dir", run_dir, *OVERRIDES, "train.select=step:2")
    assert code == 2 and "stage 'merge' was committed with a different config" in err, err
    code, out, err = _cli(capsys, "merge", "--run-dir", run_dir, "--restart", *OVERRIDES, "train.select=step:2")
    assert code == 0, err
    assert "delta_mean of 2 experts at step 2" in out + err
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert stages["train"]["status"] == "committed" and stages["train"].get("attempts") == 1
    assert (stages["merge"]["status"], stages["merge"]["select"], stages["merge"]["step"]) == ("committed", "step:2", 2)


@pytest.mark.parametrize("value", ["first", "step:0", "step:-2", "step:", "6", "step:six"])
def test_a_bad_select_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"^train\.select: .*must be 'last' or 'step:N'"):
        load_config("tiny", [f"train.select={value}"])


def test_on_an_object_store_the_merge_copies_the_adapter_files_only(trained, tmp_path):
    root, _ = trained
    remote = RunDir(f"memory://{tmp_path.name}/run")
    remote.put_dir(root / "experts", "experts")
    assert not remote.is_local and remote.exists("experts", "coco", "checkpoints", "step-000002", WEIGHT_NAME)
    copied = copy_adapter_files(remote, "experts/coco", tmp_path / "local")
    assert sorted(p.name for p in copied.iterdir()) == ["adapter_config.json", WEIGHT_NAME]

    summary = run_merge_stage(load_config("tiny", [*OVERRIDES, "train.select=step:2"]), remote)
    assert summary["step"] == 2
    merge_experts({e: _checkpoint(root, e, 2) for e in EXPERTS}, tmp_path / "of-step-2")
    remote.get_dir("merged", tmp_path / "merged")
    _assert_same_deltas(tmp_path / "merged", tmp_path / "of-step-2")
