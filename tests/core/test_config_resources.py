"""One ``resources`` section per stage: the model, the keys it replaced (refused, naming the new
key), the stage hashes it stays out of, and run directories made before it (they still resume)."""

from __future__ import annotations

import json

import pytest

from selma.config import load_config
from selma.core.config import Resources, SelmaConfig, legacy_layout, upgrade_recorded_config
from selma.core.errors import ConfigError

# Every compute key before ``resources``, the key that replaced it and a value the old key took.
REPLACED = {
    "prompts.concurrency": ("prompts.resources.workers", 2),
    "prompts.gpus_per_worker": ("prompts.resources.gpus", 1),
    "prompts.cpus_per_worker": ("prompts.resources.cpus", 2),
    "images.num_actors": ("images.resources.workers", 2),
    "images.gpus_per_actor": ("images.resources.gpus", 1),
    "images.cpus_per_actor": ("images.resources.cpus", 2),
    "images.resources_per_actor": ("images.resources.custom", {"gpu_node": 1}),
    "train.num_workers": ("train.resources.workers", 2),
    "train.use_gpu": ("train.resources.gpus", False),
    "train.cpus_per_worker": ("train.resources.cpus", 0.5),
    "train.resources_per_worker": ("train.resources.custom", {"gpu_node": 1}),
    "serve.num_replicas": ("serve.resources.workers", 2),
    "serve.gpus_per_replica": ("serve.resources.gpus", 1),
    "serve.cpus_per_replica": ("serve.resources.cpus", 2),
    "eval.num_actors": ("eval.resources.workers", 2),
    "eval.gpus_per_actor": ("eval.resources.gpus", 1),
    "eval.cpus_per_actor": ("eval.resources.cpus", 2),
    "eval.vqa.num_actors": ("eval.vqa.resources.workers", 2),
    "eval.vqa.gpus_per_actor": ("eval.vqa.resources.gpus", 1),
    "eval.vqa.cpus_per_actor": ("eval.vqa.resources.cpus", 2),
    "eval.questions.concurrency": ("eval.questions.resources.workers", 2),
    "eval.questions.gpus_per_worker": ("eval.questions.resources.gpus", 1),
    "eval.questions.cpus_per_worker": ("eval.questions.resources.cpus", 2),
}
# eval.questions is unset in the presets; these make it a valid section.
QUESTIONS = ["eval.questions.backend=transformers", "eval.questions.model=some/llm"]

# stage_hashes(load_config("tiny", LEGACY_OVERRIDES)) before ``resources`` (selma at 2b60dd4), with
# LEGACY_OVERRIDES then written images.num_actors=2, train.num_workers=2, ...
LEGACY_TINY = {"prompts": "0546a53e8c275901", "images": "722e10e4680bd1cb", "train": "19942a7da755061c",
               "merge": "6245b872793fb1bd"}
LEGACY_BUSY = {"prompts": "91cfb74901b32f47", "images": "56d2eda5c2bb2160", "train": "1f7ad429d1b26fbe",
               "merge": "1d1a465ef9004476"}
BUSY = ["prompts.resources.workers=2", "prompts.resources.cpus=0.5", "images.resources.workers=2",
        "images.resources.cpus=2", "images.resources.custom={gpu_node: 1}", "train.resources.workers=2",
        "train.batch_size=2", "train.effective_batch_size=4", "train.resources.cpus=0.5",
        "train.resources.custom={gpu_node: 1}"]


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def test_every_stage_has_resources_with_the_defaults_of_the_keys_they_replaced():
    config = SelmaConfig(model="m", eval={"questions": {"model": "some/llm"}})
    for section in ("prompts", "images", "serve", "eval", "eval.vqa", "eval.questions"):
        assert _get(config, section).resources == Resources(workers=1, cpus=1, gpus=0), section
    assert config.train.resources == Resources(workers=1, cpus=1, gpus=1)  # was train.use_gpu: true
    assert config.serve.autoscaling is None


def test_resources_spell_the_ray_options_once():
    plain = Resources()
    assert plain.ray_options() == {"num_cpus": 1}
    assert plain.per_worker() == {"CPU": 1}
    assert plain.cpu_threads == 1
    pinned = Resources(workers=3, cpus=2.5, gpus=0.5, custom={"gpu_node": 1}, accelerator_type="A100")
    assert pinned.ray_options() == {"num_cpus": 2.5, "num_gpus": 0.5, "resources": {"gpu_node": 1},
                                    "accelerator_type": "A100"}
    assert pinned.per_worker() == {"CPU": 2.5, "GPU": 0.5, "gpu_node": 1}
    assert pinned.total() == {"CPU": 7.5, "GPU": 1.5, "gpu_node": 3}
    assert pinned.cpu_threads is None  # a GPU worker keeps torch's own thread count
    assert Resources(cpus=0.25).cpu_threads == 1
    scaling = pinned.scaling_config()
    assert (scaling.num_workers, scaling.use_gpu, scaling.accelerator_type) == (3, True, "A100")
    assert scaling.resources_per_worker == {"CPU": 2.5, "GPU": 0.5, "gpu_node": 1}
    assert Resources(gpus=0).scaling_config().use_gpu is False


@pytest.mark.parametrize("override, message", [
    ("images.resources.workers=0", "images.resources.workers: .*greater than or equal to 1"),
    ("train.resources.cpus=0", "train.resources.cpus: .*greater than 0"),
    ("serve.resources.gpus=-1", "serve.resources.gpus: .*greater than or equal to 0"),
    ("eval.vqa.resources.nodes=2", "eval.vqa.resources.nodes: unknown field"),
])
def test_bad_resources_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_train_checks_use_the_resources():
    with pytest.raises(ConfigError, match=r"batch_size × resources.workers \(8\)"):
        load_config("tiny", ["train.resources.workers=2", "train.effective_batch_size=4"])
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        load_config("tiny", ["train.strategy=deepspeed", "train.mixed_precision=fp16", "train.resources.gpus=0"])
    config = load_config("tiny", ["train.resources.workers=2", "train.batch_size=2", "train.effective_batch_size=8"])
    assert config.train.gradient_accumulation_steps == 2


@pytest.mark.parametrize("old", sorted(REPLACED))
def test_a_replaced_key_is_refused_naming_its_new_key_as_an_override(old):
    new, value = REPLACED[old]
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [*QUESTIONS, f"{old}={json.dumps(value)}"])
    assert str(info.value) == f"{old}: replaced by {new}"


@pytest.mark.parametrize("old", sorted(REPLACED))
def test_a_replaced_key_is_refused_naming_its_new_key_in_a_yaml_file(old, tmp_path):
    import yaml

    new, value = REPLACED[old]
    data = {"extends": "tiny", "eval": {"questions": {"backend": "transformers", "model": "some/llm"}}}
    *sections, key = old.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{old}: replaced by {new}"


def test_several_replaced_keys_are_each_named():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["images.num_actors=2", "images.gpus_per_actor=1", "serve.num_replicas=2"])
    assert str(info.value).splitlines()[1:] == [
        "  images.num_actors: replaced by images.resources.workers",
        "  images.gpus_per_actor: replaced by images.resources.gpus",
        "  serve.num_replicas: replaced by serve.resources.workers"]


def test_resources_stay_out_of_the_stage_hashes_but_for_the_train_workers():
    from selma.pipeline import stage_hashes

    base = stage_hashes(load_config("tiny"))
    elsewhere = load_config("tiny", [
        "prompts.resources={workers: 4, cpus: 2}", "images.resources={workers: 8, gpus: 1, accelerator_type: A100}",
        "images.resources.custom={gpu_node: 1}", "train.resources={cpus: 2, gpus: 1, custom: {gpu_node: 1}}",
        "serve.resources.workers=3", "eval.resources.workers=2", "eval.vqa.resources.workers=2"])
    assert stage_hashes(elsewhere) == base
    sharded = stage_hashes(load_config("tiny", ["train.resources.workers=2", "train.batch_size=2"]))
    assert sharded["images"] == base["images"] and sharded["train"] != base["train"]


def test_the_legacy_hashes_are_those_selma_recorded_before_resources():
    from selma.pipeline import stage_hashes

    assert stage_hashes(load_config("tiny"), legacy=True) == LEGACY_TINY
    assert stage_hashes(load_config("tiny", BUSY), legacy=True) == LEGACY_BUSY
    assert stage_hashes(load_config("tiny", BUSY)) != LEGACY_BUSY


def _run_recorded_before_resources(run_dir, hashes: dict[str, str]):
    """A run.json as selma wrote it before ``resources``: every stage committed under ``hashes``."""
    from selma.core.rundir import RunDir

    run_dir.mkdir()
    stages = {name: {"status": "committed", "config_hash": value, "started_at": 1.0, "finished_at": 2.0}
              for name, value in hashes.items()}
    (run_dir / "run.json").write_text(json.dumps({"selma_version": "0.1.0", "stages": stages}))
    return RunDir(str(run_dir))


def test_a_run_made_before_resources_is_committed_for_the_same_config_in_the_new_layout(tmp_path):
    from selma.core.rundir import RunDirError
    from selma.pipeline import RUN_STAGE_NAMES, plan_stages

    run = _run_recorded_before_resources(tmp_path / "run", LEGACY_BUSY)
    config = load_config("tiny", BUSY)
    assert plan_stages(config, run, RUN_STAGE_NAMES) == []

    other_compute = load_config("tiny", [*BUSY, "images.resources.workers=3"])
    assert not run.is_committed("images", *_accepted(other_compute)["images"])
    with pytest.raises(RunDirError, match="stage 'images' was committed with a different config"):
        plan_stages(other_compute, run, RUN_STAGE_NAMES)
    with pytest.raises(RunDirError, match="stage 'prompts' was committed with a different config"):
        plan_stages(load_config("tiny", [*BUSY, "prompts.temperature=0.5"]), run, RUN_STAGE_NAMES)


def test_a_stage_begun_before_resources_resumes_and_is_recorded_under_the_new_hash(tmp_path):
    from selma.pipeline import RUN_STAGE_NAMES, plan_stages, stage_hashes

    run = _run_recorded_before_resources(tmp_path / "run", {k: LEGACY_TINY[k] for k in ("prompts", "images")})
    run.update_stage("train", status="failed", config_hash=LEGACY_TINY["train"])
    config = load_config("tiny")
    assert [s.name for s in plan_stages(config, run, RUN_STAGE_NAMES)] == ["train", "merge"]
    run.begin_stage("train", *_accepted(config)["train"])
    assert run.stage("train")["config_hash"] == stage_hashes(config)["train"]


def _accepted(config):
    from selma.pipeline import accepted_hashes

    return accepted_hashes(config)


def test_a_config_recorded_before_resources_is_read_in_the_new_layout():
    config = load_config("tiny", BUSY)
    recorded = legacy_layout(config.model_dump(mode="json"))
    assert recorded["images"]["num_actors"] == 2 and recorded["train"]["use_gpu"] is False
    assert "resources" not in recorded["images"]
    assert SelmaConfig.model_validate(upgrade_recorded_config(recorded)) == config

    recorded["train"].update(use_gpu=True, num_workers=2, cpus_per_worker=0.5, resources_per_worker={"gpu_node": 1})
    del recorded["train"]["resources"]
    upgraded = SelmaConfig.model_validate(upgrade_recorded_config(recorded))
    assert upgraded.train.resources == Resources(workers=2, gpus=1, cpus=0.5, custom={"gpu_node": 1})


def test_serving_a_run_made_before_resources_reads_its_recorded_config(tmp_path):
    from selma.serve.run import load_run_config

    run = _run_recorded_before_resources(tmp_path / "run", LEGACY_TINY)
    recorded = legacy_layout(load_config("tiny", ["serve.resources.workers=2"]).model_dump(mode="json"))
    assert recorded["serve"]["num_replicas"] == 2
    run.update_manifest(config=recorded)
    config, _ = load_run_config(str(tmp_path / "run"), ["serve.resources.gpus=1"])
    assert config.serve.resources == Resources(workers=2, gpus=1)
