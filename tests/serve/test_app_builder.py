"""`serve run selma.serve.run:app_builder run_dir=...` and the shipped Serve config, without starting Serve."""

from pathlib import Path

import pytest
import yaml
from lora_helpers import write_random_lora

SERVE_YAML = Path(__file__).parents[2] / "cluster" / "serve.yaml"
KEY_ENV = "SELMA_TEST_BUILDER_API_KEY"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run directory as the pipeline leaves it: run.json, two experts, a committed merge."""
    from selma.config import load_config
    from selma.core.models import resolve_model
    from selma.core.rundir import RunDir

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


def test_an_expert_still_training_is_not_served(finished_run, tmp_path):
    import shutil

    from selma.serve.run import load_run_config, run_adapters

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = run_dir / "experts" / "whoops" / "checkpoints" / "step-000006"
    shutil.copytree(finished_run / "experts" / "whoops", checkpoint)
    (run_dir / "experts" / "whoops" / "pytorch_lora_weights.safetensors").unlink()  # only its checkpoints so far
    config, run = load_run_config(str(run_dir))
    assert sorted(run_adapters(config, run)) == ["expert-coco", "merged"]


def test_app_builder_takes_the_run_and_typed_overrides(finished_run):
    from ray.serve import Application

    from selma.serve.run import app_builder, load_run_config

    app = app_builder({"run_dir": str(finished_run), "serve.model": "expert-coco", "serve.allow_unauthenticated": True,
                       "serve.autoscaling": {"min_replicas": 1, "max_replicas": 3}, "serve.max_batch_size": "2"})
    assert isinstance(app, Application)
    config, _ = load_run_config(str(finished_run), values={"serve.autoscaling": {"max_replicas": 3},
                                                           "serve.max_batch_size": "2"})
    assert config.serve.autoscaling.max_replicas == 3 and config.serve.max_batch_size == 2


def test_app_builder_names_what_is_wrong(finished_run):
    from selma.core.errors import ConfigError
    from selma.serve.run import app_builder

    with pytest.raises(ValueError, match="needs run_dir"):
        app_builder({})
    with pytest.raises(ConfigError, match=r"^serve\.model: .* no 'expert-countbench' to serve .*'expert-coco'"):
        app_builder({"run_dir": str(finished_run), "serve.model": "expert-countbench"})
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        app_builder({"run_dir": str(finished_run), "serve.max_batch_size": 0})
    with pytest.raises(ConfigError, match="no run.json"):
        app_builder({"run_dir": str(finished_run / "nothing")})


def test_app_builder_fails_closed_without_a_key(finished_run, monkeypatch):
    """Without Ray (``serve run IMPORT_PATH`` builds before Serve starts) the proxy's host is not
    known here: a key is required unless serve.allow_unauthenticated."""
    from ray.serve import Application

    from selma.core.errors import ConfigError
    from selma.serve.app import proxy_host
    from selma.serve.run import app_builder

    if proxy_host() is not None:
        pytest.skip("a Serve instance runs in this session's Ray")
    args = {"run_dir": str(finished_run)}
    with pytest.raises(ConfigError, match=r"^serve\.api_key_env: not set, .*serve\.allow_unauthenticated=true"):
        app_builder(args)
    assert isinstance(app_builder({**args, "serve.allow_unauthenticated": "true"}), Application)

    keyed = {**args, "serve.api_key_env": KEY_ENV}
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"^serve\.api_key_env: names the environment variable {KEY_ENV}, "
                                          "which is not set"):
        app_builder(keyed)
    monkeypatch.setenv(KEY_ENV, " ")
    with pytest.raises(ConfigError, match=rf"{KEY_ENV}, which is empty"):
        app_builder({**keyed, "serve.allow_unauthenticated": True})
    monkeypatch.setenv(KEY_ENV, "k")
    assert isinstance(app_builder(keyed), Application)


def test_the_shipped_serve_config_is_a_valid_serve_deploy_file():
    from ray.serve.schema import ServeDeploySchema

    from selma.config import build_config, load_config
    from selma.core.config import apply_override

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    [application] = schema.applications
    assert application.import_path == "selma.serve.run:app_builder"
    assert "run_dir" in application.args
    data = load_config("tiny").model_dump(mode="json")
    for key, value in application.args.items():  # every other arg is a selma override
        if key != "run_dir":
            apply_override(data, key.split("."), value)
    serve = build_config(data).serve
    assert serve.autoscaling.max_replicas == 4
    assert serve.api_key_env and not serve.allow_unauthenticated, "it listens on 0.0.0.0: a key is required"
