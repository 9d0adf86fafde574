"""`selma train` on Ray for real: DeepSpeed and DDP with 2 CPU workers on gloo, concurrent and queued
experts, joint mode, a killed worker, a killed driver, and bad images."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

BASE = ["--config", "tiny", "skills.names=[coco,whoops]", "prompts.per_skill=8", "images.steps=2"]
SMALL_BATCH = ["train.batch_size=2", "train.effective_batch_size=4", "train.checkpoint_every=2"]


def _selma(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selma", *args], capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """Prompts and images for two skills, committed; each test trains on its own copy."""
    run_dir = tmp_path_factory.mktemp("train") / "images"
    _ok(_selma("run", "--until", "images", "--run-dir", str(run_dir), *BASE))
    return run_dir


@pytest.fixture
def run_dir(image_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(image_run, copy)
    return copy


def _metrics(run_dir: Path, expert: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "experts" / expert / "metrics.jsonl").read_text().splitlines()]


def _assert_expert_loads_in_diffusers(run_dir: Path, expert: str) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from selma.core.models import resolve_model

    pipe = DiffusionPipeline.from_pretrained(resolve_model("tiny:sd"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = pipe.unet(sample, 500, hidden).sample
        pipe.load_lora_weights(str(run_dir / "experts" / expert))
        after = pipe.unet(sample, 500, hidden).sample
    assert not torch.allclose(before, after, rtol=0, atol=1e-7), "the LoRA changed nothing"


def test_deepspeed_two_workers_per_expert_two_experts_at_once(run_dir):
    """With the recipe options on: they reach the workers, and the metrics record each step's scheduled rate."""
    recipe = ["train.learning_rate=1e-3", "train.lr_scheduler=linear", "train.lr_warmup_steps=2", "train.snr_gamma=5",
              "train.noise_offset=0.05", "train.gradient_checkpointing=true"]
    out = _ok(_selma("train", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "train.strategy=deepspeed",
                     "train.zero_stage=2", "train.resources.workers=2", "train.resources.cpus=0.5", "train.max_steps=4",
                     *recipe))
    assert "at a time" not in out  # both experts fit the cluster: nothing queued
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == [1, 2, 3, 4]
        # linear: warm-up from 0 over 2 steps, then down to 0 at step 4 (each step's own rate)
        assert [m["lr"] for m in _metrics(run_dir, expert)] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
        card = (run_dir / "experts" / expert / "README.md").read_text()
        assert '"strategy": "deepspeed"' in card and '"workers": 2' in card and "base_model: tiny:sd" in card
        assert '"snr_gamma": 5.0' in card and '"gradient_checkpointing": true' in card
        _assert_expert_loads_in_diffusers(run_dir, expert)
    checkpoints = sorted(p for p in (run_dir / "_work" / "train" / "expert-coco").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # num_to_keep
    latest = checkpoints[-1]
    assert {p.name for p in (latest / "deepspeed").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert (latest / "rng-rank0.safetensors").exists() and (latest / "rng-rank1.safetensors").exists()
    assert json.loads((latest / "step.json").read_text()) == {"step": 4}


def test_ddp_two_workers_and_experts_queue_when_only_one_fits(run_dir):
    # 2 workers × 0.75 CPU + 1 CPU for the data pipeline per expert, on 3 logical CPUs: one at a time.
    out = _ok(_selma("train", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "ray.num_cpus=3",
                     "train.strategy=ddp", "train.resources.workers=2", "train.resources.cpus=0.75", "train.max_steps=2"))
    assert "2 experts, 1 at a time" in out
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == [1, 2]
        _assert_expert_loads_in_diffusers(run_dir, expert)


def test_joint_mode_trains_one_lora_on_every_skill_and_merge_passes_it_through(run_dir):
    out = _ok(_selma("run", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "train.mode=joint", "train.max_steps=2"))
    assert not (run_dir / "experts" / "coco").exists()
    assert '"skills": [\n    "coco",\n    "whoops"\n  ]' in (run_dir / "experts" / "joint" / "README.md").read_text()
    from safetensors.torch import load_file

    joint = load_file(run_dir / "experts" / "joint" / "pytorch_lora_weights.safetensors")
    merged = load_file(run_dir / "merged" / "pytorch_lora_weights.safetensors")
    assert joint.keys() == merged.keys()
    assert "expert joint done" in out


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session:  # the field after state, ppid and pgrp
                pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_training(run_dir: Path, *overrides: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"train-{time.time_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "selma", "train", "--run-dir", str(run_dir), *BASE, *overrides],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until Ray Train has registered a checkpoint of expert coco (an uploaded folder alone may
    not be registered yet); returns its step."""
    deadline = time.time() + timeout
    snapshot = run_dir / "_work" / "train" / "expert-coco" / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            latest = None
        if latest:
            return latest["metrics"]["step"]
        assert process.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)
    deadline = time.time() + 30
    while _session_pids(process.pid) and time.time() < deadline:
        for pid in _session_pids(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


LONG = [*SMALL_BATCH, "train.max_steps=30", "train.max_failures=2"]


def test_a_killed_training_worker_is_replaced_and_the_run_completes(run_dir):
    process = _start_training(run_dir, *LONG)
    try:
        _wait_for_checkpoint(run_dir, process)
        workers = [pid for pid in _session_pids(process.pid) if "RayTrainWorker" in _cmdline(pid)]
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert process.wait(timeout=600) == 0
    finally:
        if process.poll() is None:
            _kill_session(process)
    out = "".join(p.read_text() for p in run_dir.parent.glob("train-*.log"))
    assert "expert coco: resumed from its checkpoint at step" in out
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == list(range(1, 31))


def test_a_rerun_after_the_driver_dies_continues_from_the_last_checkpoint(run_dir):
    process = _start_training(run_dir, *LONG)
    try:
        checkpointed = _wait_for_checkpoint(run_dir, process)
    finally:
        _kill_session(process)
    assert not (run_dir / "experts" / "coco").exists()
    out = _ok(_selma("train", "--run-dir", str(run_dir), *BASE, *LONG))
    resumed_at = int(out.split("expert coco: resumed from its checkpoint at step ")[1].split()[0])
    assert checkpointed <= resumed_at < 30
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == list(range(1, 31))


def _corrupt_one_image(run_dir: Path, skill: str) -> str:
    import pyarrow as pa

    path = sorted((run_dir / "images" / skill).glob("*.parquet"))[0]
    table = pq.read_table(path)
    column = table.schema.field("image").type  # Hugging Face's Image struct {bytes, path}
    images = table.column("image").to_pylist()
    images[0] = {**images[0], "bytes": images[0]["bytes"][: len(images[0]["bytes"]) // 2]}  # truncated PNG
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, column))
    pq.write_table(table, path)
    return table.column("image_id")[0].as_py()


def test_an_undecodable_image_is_skipped_counted_and_reported(run_dir):
    bad = _corrupt_one_image(run_dir, "whoops")
    out = _ok(_selma("train", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "train.max_steps=2"))
    assert f"[train] whoops: skipping unusable image {bad} (undecodable image:" in out
    assert out.count("skipping unusable image") == 1  # once, though every epoch meets it
    stage = json.loads((run_dir / "run.json").read_text())["stages"]["train"]
    assert [row["image_id"] for row in stage["skipped_images"]["whoops"]] == [bad]
    assert "coco" not in stage["skipped_images"]


def test_bad_lora_settings_fail_before_any_training(run_dir):
    result = _selma("train", "--run-dir", str(run_dir), *BASE, "train.rank=128")
    assert result.returncode != 0
    assert "train.rank=128 exceeds the narrowest targeted layer" in result.stderr
    assert not (run_dir / "_work" / "train").exists()
