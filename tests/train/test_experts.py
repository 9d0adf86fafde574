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


def _assert_expert_loads_in_diffusers(run_dir: Path, expert: str, folder: str = "") -> None:
    """``experts/<expert>/<folder>`` loads in plain diffusers and changes the UNet's output."""
    import torch
    from diffusers import DiffusionPipeline

    from selma.core.models import resolve_model

    pipe = DiffusionPipeline.from_pretrained(resolve_model("tiny:sd"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = pipe.unet(sample, 500, hidden).sample
        pipe.load_lora_weights(str(run_dir / "experts" / expert / folder))
        after = pipe.unet(sample, 500, hidden).sample
    assert not torch.allclose(before, after, rtol=0, atol=1e-7), "the LoRA changed nothing"


def _exported_steps(run_dir: Path, expert: str) -> list[str]:
    # A write the killed driver left half-done stays in a hidden staging folder, which readers skip.
    return sorted(p.name for p in (run_dir / "experts" / expert / "checkpoints").iterdir() if not p.name.startswith("."))


def test_deepspeed_two_workers_per_expert_two_experts_at_once(run_dir, monkeypatch):
    """Also what rides on the workers: the recipe options (the metrics record each step's scheduled
    rate), tracking (MLflow, through Ray's setup_mlflow on rank 0), validation images and the LoRA
    exported at each checkpoint."""
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the folder store

    store = run_dir.parent / "mlruns"
    recipe = ["train.learning_rate=1e-3", "train.lr_scheduler=linear", "train.lr_warmup_steps=2", "train.snr_gamma=5",
              "train.noise_offset=0.05", "train.gradient_checkpointing=true"]
    out = _ok(_selma("train", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "train.strategy=deepspeed",
                     "train.zero_stage=2", "train.resources.workers=2", "train.resources.cpus=0.5", "train.max_steps=4",
                     "train.tracking.backend=mlflow", f"train.tracking.tracking_uri={store}", "train.validate_every=2",
                     "train.validation_prompts=1", "train.validation_steps=1", *recipe))
    assert "at a time" not in out  # both experts fit the cluster: nothing queued
    client = MlflowClient(str(store))
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert sorted(runs) == ["tiny/coco", "tiny/whoops"]  # rank 0 only
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == [1, 2, 3, 4]
        assert all(m["grad_norm"] > 0 for m in _metrics(run_dir, expert))  # DeepSpeed's global grad norm
        history = client.get_metric_history(runs[f"tiny/{expert}"].info.run_id, "grad_norm")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
        assert sorted(p.name for p in (run_dir / "experts" / expert / "validation").iterdir()) == [
            "step-000002", "step-000004"]
        # linear: warm-up from 0 over 2 steps, then down to 0 at step 4 (each step's own rate)
        assert [m["lr"] for m in _metrics(run_dir, expert)] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
        card = (run_dir / "experts" / expert / "README.md").read_text()
        assert '"strategy": "deepspeed"' in card and '"workers": 2' in card and "base_model: tiny:sd" in card
        assert '"snr_gamma": 5.0' in card and '"gradient_checkpointing": true' in card
        _assert_expert_loads_in_diffusers(run_dir, expert)
        # Rank 0 of the two exported the LoRA at each checkpoint; the last is the final expert.
        assert _exported_steps(run_dir, expert) == ["step-000002", "step-000004"]
        for step in (2, 4):
            _assert_expert_loads_in_diffusers(run_dir, expert, f"checkpoints/step-{step:06d}")
        final = load_file(run_dir / "experts" / expert / "pytorch_lora_weights.safetensors")
        last = load_file(run_dir / "experts" / expert / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
        assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    checkpoints = sorted(p for p in (run_dir / "_work" / "train" / "expert-coco").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # num_to_keep
    latest = checkpoints[-1]
    assert {p.name for p in (latest / "deepspeed").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert (latest / "rng-rank0.safetensors").exists() and (latest / "rng-rank1.safetensors").exists()
    assert json.loads((latest / "step.json").read_text()) == {"step": 4}


def test_ddp_two_workers_experts_queue_when_only_one_fits_and_an_undecodable_image_is_skipped(run_dir):
    # 2 workers × 0.75 CPU + 1 CPU for the data pipeline per expert, on 3 logical CPUs: one at a time.
    bad = _corrupt_one_image(run_dir, "whoops")
    out = _ok(_selma("train", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "ray.num_cpus=3",
                     "train.strategy=ddp", "train.resources.workers=2", "train.resources.cpus=0.75", "train.max_steps=2"))
    assert "2 experts, 1 at a time" in out
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == [1, 2]
        _assert_expert_loads_in_diffusers(run_dir, expert)
    assert f"[train] whoops: skipping unusable image {bad} (undecodable image:" in out
    assert out.count("skipping unusable image") == 1  # once, though every epoch and both workers meet it
    stage = json.loads((run_dir / "run.json").read_text())["stages"]["train"]
    assert [row["image_id"] for row in stage["skipped_images"]["whoops"]] == [bad]
    assert "coco" not in stage["skipped_images"]


def test_joint_mode_from_cached_latents_trains_one_lora_on_every_skill_and_merge_passes_it_through(run_dir):
    # The cache's reuse across runs and its equivalence to the uncached loss are tested Ray-free
    # (tests/train/test_cache.py); here it is filled and read by the real stage.
    out = _ok(_selma("run", "--run-dir", str(run_dir), *BASE, *SMALL_BATCH, "train.mode=joint", "train.max_steps=2",
                     "train.cache_latents=true"))
    assert "0 images cached already, 16 to encode" in out and "latent cache: encoded 16 images" in out
    (cache,) = (run_dir / "cache").iterdir()
    for skill in ("coco", "whoops"):
        images = pq.read_table(run_dir / "images" / skill, columns=["image_id"]).column("image_id").to_pylist()
        rows = pq.read_table(cache / skill, columns=["image_id", "error"]).to_pylist()
        assert sorted(r["image_id"] for r in rows) == sorted(images) and not any(r["error"] for r in rows)
    stage = json.loads((run_dir / "run.json").read_text())["stages"]["train"]
    assert stage["latent_cache"]["key"] == cache.name and stage["latent_cache"]["encoded"] == 16
    assert [m["step"] for m in _metrics(run_dir, "joint")] == [1, 2]
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


def _registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint of expert coco that Ray Train has registered (an uploaded
    folder alone may not be registered yet); 0 if none."""
    snapshot = run_dir / "_work" / "train" / "expert-coco" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        latest = None
    return latest["metrics"]["step"] if latest else 0


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, after: int = 0, timeout: float = 300) -> int:
    """Wait until a checkpoint of expert coco beyond step ``after`` is registered; returns its step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (step := _registered_step(run_dir)) > after:
            return step
        assert process.poll() is None, "training ended before the checkpoint waited for"
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


def test_a_rerun_after_the_driver_dies_resumes_and_then_a_killed_worker_is_replaced(run_dir):
    # One scenario, two failures (each costs a trainer start-up, the suite's slowest part):
    # 1. the driver's whole session dies after a checkpoint; nothing is committed;
    first = _start_training(run_dir, *LONG)
    try:
        _wait_for_checkpoint(run_dir, first)
    finally:
        _kill_session(first)
    checkpointed = _registered_step(run_dir)
    # Nothing committed: only the LoRAs exported at checkpoints, no final expert.
    assert not (run_dir / "experts" / "coco" / "pytorch_lora_weights.safetensors").exists()
    # 2. the same command again continues from that checkpoint; once it has checkpointed further,
    #    its training workers are killed: Ray Train replaces them and they resume too.
    for log in run_dir.parent.glob("train-*.log"):
        log.unlink()
    rerun = _start_training(run_dir, *LONG)
    try:
        _wait_for_checkpoint(run_dir, rerun, after=checkpointed)
        workers = [pid for pid in _session_pids(rerun.pid) if "RayTrainWorker" in _cmdline(pid)]
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert rerun.wait(timeout=600) == 0
    finally:
        if rerun.poll() is None:
            _kill_session(rerun)
    out = "".join(p.read_text() for p in run_dir.parent.glob("train-*.log"))
    resumes = [int(part.split()[0]) for part in out.split("expert coco: resumed from its checkpoint at step ")[1:]]
    assert len(resumes) == 2, out[-3000:]
    assert checkpointed <= resumes[0] < resumes[1] < 30
    for expert in ("coco", "whoops"):
        assert [m["step"] for m in _metrics(run_dir, expert)] == list(range(1, 31))
        # Steps exported before the driver died and again after the resume are there once each.
        assert _exported_steps(run_dir, expert) == [f"step-{step:06d}" for step in range(2, 31, 2)]


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


def test_bad_lora_settings_fail_before_any_training(run_dir):
    result = _selma("train", "--run-dir", str(run_dir), *BASE, "train.rank=128")
    assert result.returncode != 0
    assert "train.rank=128 exceeds the narrowest targeted layer" in result.stderr
    assert not (run_dir / "_work" / "train").exists()
