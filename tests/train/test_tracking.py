"""Experiment tracking and validation images without Ray: LoraTrainStep on the tiny model, driven
step by step with the monitor the train loop uses, logging to real MLflow, TensorBoard and wandb
(offline) stores that are read back."""

import glob
import json
import struct
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.core.ids import prompt_id
from selma.core.rundir import RunDir
from selma.train import tracking
from selma.train.data import PrepareTrainingBatch
from selma.train.experts import ExpertJob, _write_expert, expert_monitor, preflight_train
from selma.train.step import LoraTrainStep, load_training_components, lora_state_dict

SKILL_PROMPTS = {"coco": ["a red cube", "two cats on a sofa", "a blue bowl of soup"],
                 "whoops": ["a fish riding a bicycle", "an ice cube in a hot oven"]}


def _batch(model: str) -> dict:
    """Two 64² images and their prompts, prepared as the train stage's data pipeline prepares them."""
    import io

    import numpy as np
    from PIL import Image

    pngs = []
    for color in ((200, 30, 30), (30, 30, 200)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), color, np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    rows = {"image": np.array(pngs, dtype=object), "prompt": np.array(["a red square", "a blue square"], dtype=object)}
    prepared, _ = PrepareTrainingBatch(model, 64, random_crop=False, random_flip=False)(rows)
    return {key: torch.from_numpy(value) for key, value in prepared.items()}


def _run(tmp_path: Path) -> RunDir:
    """A run directory holding only prompts (what validation images are drawn from)."""
    run = RunDir(str(tmp_path / "run"))
    for skill, prompts in SKILL_PROMPTS.items():
        run.write_table(f"prompts/{skill}/part-0.parquet", pa.table({
            "prompt_id": [prompt_id(skill, p) for p in prompts], "skill": [skill] * len(prompts), "prompt": prompts,
            "origin": ["seed"] * len(prompts)}))
    return run


def _config(*overrides: str):
    return load_config("tiny", ["name=trk", "skills.names=[coco,whoops]", "train.batch_size=2",
                                "train.effective_batch_size=2", "train.max_steps=3", "train.validation_steps=1",
                                *overrides])


def _train_expert(config, expert: str, run: RunDir, *, steps: int | None = None, monitor=True) -> tuple[dict, list]:
    """What train_expert_loop does on rank 0, for one expert, on one fixed batch."""
    job = ExpertJob.from_config(config, expert, run, resolution=64)
    torch.manual_seed(0)
    components = load_training_components(job.model, job.train)
    trainer = LoraTrainStep(components, job.train, seed=1)
    watcher = expert_monitor(job) if monitor else None
    batch = _batch(job.model)
    metrics = []
    while trainer.step < (steps or job.train.max_steps):
        loss, stepped = trainer.train_micro_batch(batch)
        if stepped:
            record = {"step": trainer.step, "loss": loss, "lr": job.train.learning_rate, "samples_per_s": 10.0 + trainer.step,
                      "grad_norm": trainer.grad_norm}
            metrics.append(record)
            if watcher:
                watcher.after_step(trainer, record)
                assert components.unet.training, "validation left the UNet in eval mode"
    if watcher:
        watcher.close()
    state = trainer.lora_state_dict()
    _write_expert(job, state, metrics)
    return state, metrics


def test_mlflow_holds_one_run_per_expert_with_its_metric_histories_and_validation_images(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the folder store

    store = tmp_path / "mlruns"
    config = _config("train.tracking.backend=mlflow", f"train.tracking.tracking_uri={store}", "train.validate_every=2",
                     "train.validation_prompts=2")
    run = _run(tmp_path)
    preflight_train(config, run)
    metrics = {expert: _train_expert(config, expert, run)[1] for expert in ("coco", "whoops")}

    client = MlflowClient(str(store))
    experiment = client.get_experiment_by_name("trk")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["trk/coco", "trk/whoops"]
    for expert, records in metrics.items():
        found = runs[f"trk/{expert}"]
        assert found.info.status == "FINISHED" and found.data.tags["selma.expert"] == expert
        assert found.data.params["train/rank"] == "4" and found.data.params["expert"] == expert
        for key in ("loss", "lr", "samples_per_s", "grad_norm"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
            assert [s for s, _ in history] == [r["step"] for r in records], key
            assert [v for _, v in history] == pytest.approx([r[key] for r in records]), key
        assert all(r["grad_norm"] > 0 for r in records)
        images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
        # validate_every=2 and the last step (3): two prompts each
        assert {p.split("+step+")[1].split("+")[0] for p in images if p.endswith(".png")} == {"2", "3"}
        assert {p.split("+")[0] for p in images if p.endswith(".png")} == {"images/validation_0", "images/validation_1"}
    # A worker restarted from a checkpoint continues its expert's run.
    resumed = tracking.open_tracker(config.train.tracking, tracking.TrackingTarget("trk", run.uri, "coco", resumed_step=2))
    resumed.close()
    assert resumed.run_id == runs["trk/coco"].info.run_id
    assert len(client.search_runs([experiment.experiment_id])) == 2
    written = tmp_path / "run" / "experts" / "coco"
    assert (written / "pytorch_lora_weights.safetensors").exists(), "the final write happened"
    assert sorted(p.name for p in (written / "validation").iterdir()) == ["step-000002", "step-000003"]
    step = written / "validation" / "step-000003"
    assert sorted(p.name for p in step.iterdir()) == ["0.png", "1.png", "prompts.json"]
    described = json.loads((step / "prompts.json").read_text())
    first_two = sorted((prompt_id("coco", p), p) for p in SKILL_PROMPTS["coco"])[:2]
    assert [(i["prompt_id"], i["prompt"]) for i in described["images"]] == first_two
    assert described["steps"] == 1 and described["step"] == 3
    assert [json.loads(line)["grad_norm"] for line in (written / "metrics.jsonl").read_text().splitlines()] == \
        [r["grad_norm"] for r in metrics["coco"]]


def test_tensorboard_event_files_hold_the_scalars_per_step_and_the_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config("train.tracking=tensorboard", "train.validate_every=3", "train.validation_prompts=1")
    run = _run(tmp_path)
    _, records = _train_expert(config, "coco", run)
    events = EventAccumulator(str(tmp_path / "run" / "_work" / "tensorboard" / "trk" / "coco"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "samples_per_s", "grad_norm"}
    for key in ("loss", "grad_norm", "samples_per_s"):
        assert [e.step for e in events.Scalars(key)] == [r["step"] for r in records]
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in records])
    assert [(e.step, e.width, e.height) for e in events.Images("validation/0")] == [(3, 64, 64)]


def _wandb_records(path: str):
    """The protobuf records of an offline run's .wandb file (LevelDB-style log: 32 KiB blocks of
    checksum, length, type, payload; a record may span blocks as first/middle/last pieces)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_per_expert_holds_the_metric_history_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config("train.tracking.backend=wandb", "train.tracking.mode=offline", "train.tracking.project=selma-test",
                     "train.validate_every=3", "train.validation_prompts=2")
    run = _run(tmp_path)
    _, records = _train_expert(config, "whoops", run)
    [path] = glob.glob(str(tmp_path / "run" / "_work" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, header = [], None
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            header = record.run
        elif record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    assert (header.display_name, header.project, header.run_group) == ("trk/whoops", "selma-test", "trk")
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in records])
    assert [h["grad_norm"] for h in history] == pytest.approx([r["grad_norm"] for r in records])
    assert sorted(history[-1]["validation/captions"]) == sorted(SKILL_PROMPTS["whoops"])
    assert history[-1]["validation/count"] == 2 and "validation/count" not in history[0]


def test_validation_images_leave_the_training_untouched_and_show_the_lora(tmp_path):
    """Same LoRA after 4 steps with validation at every step as without it; the images change as the
    LoRA trains (the adapter is active) and are the same when redrawn (fixed seeds)."""
    run = _run(tmp_path)
    config = _config("train.validate_every=1", "train.validation_prompts=1", "train.max_steps=4",
                     "train.learning_rate=0.01")
    with_validation, _ = _train_expert(config, "coco", run)
    without, _ = _train_expert(_config("train.max_steps=4", "train.learning_rate=0.01"), "coco", run, monitor=False)
    assert with_validation.keys() == without.keys()
    for key in without:
        assert torch.equal(with_validation[key], without[key]), key
    folder = tmp_path / "run" / "experts" / "coco" / "validation"
    first, last = ((folder / f"step-00000{n}" / "0.png").read_bytes() for n in (1, 4))
    assert first != last
    # The same step's images redrawn from the saved LoRA state: identical.
    job = ExpertJob.from_config(config, "coco", run, resolution=64)
    torch.manual_seed(0)
    components = load_training_components(job.model, job.train)
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(components.unet, with_validation)
    assert lora_state_dict(components.unet).keys() == with_validation.keys()
    expert_monitor(job, resumed_step=4).validator.run(components, 4)
    assert (folder / "step-000004" / "0.png").read_bytes() == last


def test_a_rerun_from_step_0_clears_old_validation_images_and_a_resume_keeps_them(tmp_path):
    run = _run(tmp_path)
    folder = tmp_path / "run" / "experts" / "coco" / "validation" / "step-000999"
    folder.mkdir(parents=True)
    job = ExpertJob.from_config(_config("train.validate_every=2"), "coco", run, resolution=64)
    expert_monitor(job, resumed_step=2)
    assert folder.exists()
    expert_monitor(job, resumed_step=0)
    assert not folder.exists()


def test_joint_validation_prompts_take_each_skill_in_turn(tmp_path):
    run = _run(tmp_path)
    job = ExpertJob.from_config(_config("train.mode=joint", "train.validate_every=5", "train.validation_prompts=3"),
                                "joint", run, resolution=64)
    coco, whoops = (sorted((prompt_id(s, p), p) for p in SKILL_PROMPTS[s]) for s in ("coco", "whoops"))
    assert job.validation.prompts == (coco[0][1], whoops[0][1], coco[1][1])
    assert job.validation.steps == 1 and job.validation.guidance_scale == 7.5 and job.validation.every == 5
    assert len(set(job.validation.seeds)) == 3


def test_tracking_settings_are_checked_and_never_change_the_train_hash(tmp_path, monkeypatch):
    base = load_config("tiny").section_hash("model", "train")
    watched = load_config("tiny", ["train.tracking.backend=mlflow", "train.tracking.tracking_uri=http://mlflow:5000",
                                   "train.validate_every=100", "train.validation_prompts=8", "train.validation_steps=20"])
    assert watched.section_hash("model", "train") == base
    assert load_config("tiny", ["train.tracking=wandb"]).train.tracking.backend == "wandb"
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny", ["train.tracking.backend=tensorboard", "train.tracking.log_dir=tb"]).train.tracking.log_dir == \
        str(tmp_path / "tb")
    with pytest.raises(ConfigError, match=r"\['project'\] are not settings of backend 'mlflow'"):
        load_config("tiny", ["train.tracking.backend=mlflow", "train.tracking.project=x"])
    with pytest.raises(ConfigError, match="train.tracking.backend: Input should be 'mlflow', 'tensorboard' or 'wandb'"):
        load_config("tiny", ["train.tracking=neptune"])
    with pytest.raises(ConfigError, match="validation images are not drawn under zero_stage 3"):
        load_config("tiny", ["train.strategy=deepspeed", "train.zero_stage=3", "train.validate_every=10"])
    monkeypatch.setitem(tracking.BACKEND_PACKAGES, "wandb", ("selma_not_installed_module", "wandb"))
    with pytest.raises(ConfigError, match=r"train.tracking.backend: wandb needs the selma_not_installed_module "
                                          r"package, which is not installed: pip install 'wandb'"):
        preflight_train(load_config("tiny", ["train.tracking=wandb"]), RunDir(str(tmp_path / "run")))
