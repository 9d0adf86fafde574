"""`serve run selma.serve.app:app_builder run_dir=...` and the shipped Serve config, without starting Serve."""

from pathlib import Path

import pytest
import yaml

from lora_helpers import write_random_lora

SERVE_YAML = Path(__file__).parents[2] / "cluster" / "serve.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run directory as the pipeline leaves it: run.json, two experts, a committed merge."""
    from selma.config import load_config
    from selma.models.tiny import resolve_model
    from selma.rundir import RunDir

    run_dir = tmp_path_factory.mktemp("served") / "run"
    config = load_config("tiny", ["skills.names=[coco,whoops]", f"run_dir={run_dir}"])
    run = RunDir(str(run_dir))
    run.update_manifest(config=config.model_dump(mode="json"), stages={})
    base = resolve_model("tiny:sd")
    for seed, name in enumerate(["experts/coco", "experts/whoops", "merged"]):
        write_random_lora(base, run_dir / name, seed=seed)
    run.update_stage("merge", status="committed")
    return run_dir


def test_the_run_serves_base_merged_and_every_expert(finished_run):
    from selma.serve.run import load_run_config, run_adapters

    config, run = load_run_config(str(finished_run))
    assert run_adapters(config, run) == {"merged": str(finished_run / "merged"),
                                         "expert-coco": str(finished_run / "experts" / "coco"),
                                         "expert-whoops": str(finished_run / "experts" / "whoops")}


def test_app_builder_takes_the_run_and_typed_overrides(finished_run):
    from ray.serve import Application

    from selma.serve.app import app_builder
    from selma.serve.run import load_run_config

    app = app_builder({"run_dir": str(finished_run), "serve.model": "expert-coco",
                       "serve.autoscaling": {"min_replicas": 1, "max_replicas": 3}, "serve.max_batch_size": "2"})
    assert isinstance(app, Application)
    config, _ = load_run_config(str(finished_run), values={"serve.autoscaling": {"max_replicas": 3},
                                                           "serve.max_batch_size": "2"})
    assert config.serve.autoscaling.max_replicas == 3 and config.serve.max_batch_size == 2


def test_app_builder_names_what_is_wrong(finished_run):
    from selma.config import ConfigError
    from selma.serve.app import app_builder

    with pytest.raises(ValueError, match="needs run_dir"):
        app_builder({})
    with pytest.raises(RuntimeError, match=r"no 'expert-countbench' to serve .*'expert-coco'"):
        app_builder({"run_dir": str(finished_run), "serve.model": "expert-countbench"})
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        app_builder({"run_dir": str(finished_run), "serve.max_batch_size": 0})
    with pytest.raises(ConfigError, match="no run.json"):
        app_builder({"run_dir": str(finished_run / "nothing")})


def test_the_shipped_serve_config_is_a_valid_serve_deploy_file():
    from ray.serve.schema import ServeDeploySchema

    from selma.config import apply_override, build_config, load_config

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    [application] = schema.applications
    assert application.import_path == "selma.serve.app:app_builder"
    assert "run_dir" in application.args
    data = load_config("tiny").model_dump(mode="json")
    for key, value in application.args.items():  # every other arg is a selma override
        if key != "run_dir":
            apply_override(data, key.split("."), value)
    assert build_config(data).serve.autoscaling.max_replicas == 4
