import hashlib
import json
import subprocess
import sys

import pytest

from selma.config import load_config
from selma.core.config import preset_names
from selma.core.errors import ConfigError


@pytest.mark.parametrize("preset", preset_names())
def test_every_shipped_preset_validates(preset):
    config = load_config(preset)
    assert config.name == preset
    if preset == "world":
        assert config.skills.names == ["world_counting", "world_binding", "world_spatial"]
    else:
        assert config.skills.names == ["coco", "localized_narratives", "countbench", "whoops", "diffusiondb"]


def test_presets_carry_the_papers_settings():
    for preset in ("sd14", "sd2", "sdxl"):
        config = load_config(preset)
        assert (config.images.steps, config.images.guidance_scale, config.images.images_per_prompt) == (50, 7.5, 1)
        t = config.train
        assert (t.rank, t.alpha, t.init_lora_weights, t.learning_rate) == (128, 128, "gaussian", 3e-4)
        assert (t.effective_batch_size, t.max_steps, t.max_grad_norm, t.weight_decay) == (64, 5000, 1.0, 1e-2)
        assert t.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
        assert config.prompts.per_skill == 1000 and config.prompts.rouge_threshold == 0.8
        assert config.merge.method == "delta_mean"
    assert load_config("sdxl").model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert load_config("sd2").model == "stabilityai/stable-diffusion-2"


def test_the_sdxl_release_preset_carries_the_release_scripts_settings():
    # fine-tune/ft_sd_lora_sdxl.sh (latest) and image-generation/img_gen_gpt.py of jialuli-luka/SELMA
    config, paper = load_config("sdxl-release"), load_config("sdxl")
    assert config.model == paper.model and config.vae == "madebyollin/sdxl-vae-fp16-fix" and paper.vae is None
    t = config.train
    assert (t.batch_size * t.gradient_accumulation_steps * t.resources.workers, t.effective_batch_size) == (32, 32)
    assert (t.max_steps, t.learning_rate, t.lr_scheduler, t.lr_warmup_steps) == (10000, 3e-4, "constant", 0)
    assert (t.mixed_precision, t.checkpoint_every, t.rank, t.alpha, t.seed) == ("fp16", 2000, 128, 128, 42)
    assert (config.images.steps, config.images.guidance_scale, config.images.dtype) == (50, 5.0, "float16")
    assert config.merge.method == "delta_mean"


def test_overrides_are_typed_and_nested():
    config = load_config("tiny", ["images.steps=3", "train.learning_rate=1e-3", "skills.names=[coco, whoops]",
                                  "images.negative_prompt=blurry, low quality"])
    assert config.images.steps == 3
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.skills.names == ["coco", "whoops"]
    assert config.images.negative_prompt == "blurry, low quality"


def test_extends_a_preset_from_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: tiny\nname: mine\nimages:\n  steps: 2\n")
    config = load_config(str(path))
    assert config.name == "mine" and config.images.steps == 2
    assert config.train.rank == load_config("tiny").train.rank


BAD = [
    (["images.steps=0"], "images.steps"),
    (["images.stepz=3"], "images.stepz: unknown field"),
    (["train.rank=many"], "train.rank"),
    (["images.resolution=100"], "images.resolution"),
    (["skills.names=[coco, nosuchskill]"], "skills.names"),
    (["skills.names=[coco, coco]"], "skills.names"),
    (["train.effective_batch_size=6"], "train"),
    (["merge.method=averaging"], "merge.method"),
    (["merge.weights={coco: 1.0, nope: 1.0}"], "merge.weights"),
    (["train.mode=joint", "merge.weights={coco: 1.0}"], "merge.weights"),
    (["train.mode=both"], "train.mode"),
    (["train.max_concurrent_experts=0"], "train.max_concurrent_experts"),
    (["prompts.backend=transformers"], "prompts"),
    (["prompts.chat=maybe"], "prompts.chat"),
    (["prompts.chat=true"], "chat: true"),
    (["prompts.backend=openai", "prompts.model=m", "prompts.openai.base_url=http://h/v1", "prompts.chat=true"],
     "openai.api"),
    (["prompts.openai.tpm=0"], "prompts.openai.tpm"),
    (["prompts.pricing={prompt_per_1m: -1, completion_per_1m: 1}"], "prompts.pricing.prompt_per_1m"),
    (["prompts.pricing={prompt_per_1m: 1}"], "prompts.pricing.completion_per_1m"),
    (["serve.max_ongoing_requests=1"], "serve"),
    (["images=3"], "images"),
    (["images.steps.deep=3"], "images.steps"),
    (["noequals"], "key.sub=value"),
    (["model=null"], "model"),
]


def test_joint_mode_trains_one_expert_named_joint():
    config = load_config("tiny", ["train.mode=joint", "merge.weights={joint: 1.0}"])
    assert config.expert_names == ["joint"]
    assert load_config("tiny").expert_names == load_config("tiny").skills.names


def _recorded_images_hash(images: dict) -> str:
    """The images section's hash as selma computed it when the field was truncate_long_prompts."""
    images = {k: v for k, v in images.items() if k != "resources"}  # resources stay out of every hash
    return hashlib.sha256(json.dumps({"images": images}, sort_keys=True).encode()).hexdigest()[:16]


def test_a_field_added_after_runs_were_recorded_stays_out_of_the_stage_hash_at_its_default():
    config = load_config("tiny")
    images = config.model_dump(mode="json")["images"]
    del images["truncate_prompts"]
    recorded = _recorded_images_hash(images)
    assert config.section_hash("images") == recorded
    truncating = load_config("tiny", ["images.truncate_prompts=true"])
    assert truncating.section_hash("images") != recorded
    # Renamed from truncate_long_prompts: a run recorded with it on keeps its hash.
    images["truncate_long_prompts"] = True
    assert truncating.section_hash("images") == _recorded_images_hash(images)


def test_a_renamed_key_is_refused_naming_the_new_one_and_read_from_an_old_run_json():
    from selma.core.config import SelmaConfig, upgrade_recorded_config

    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["images.truncate_long_prompts=true"])
    assert str(info.value) == "images.truncate_long_prompts: replaced by images.truncate_prompts"
    recorded = load_config("tiny", ["images.truncate_prompts=true"]).model_dump(mode="json")
    recorded["images"]["truncate_long_prompts"] = recorded["images"].pop("truncate_prompts")
    assert SelmaConfig.model_validate(upgrade_recorded_config(recorded)).images.truncate_prompts is True


def test_pacing_and_pricing_never_change_the_prompt_stage_hash():
    from selma.pipeline import accepted_hashes, stage_hashes

    base = stage_hashes(load_config("tiny"))
    paced = load_config("tiny", ["prompts.openai.qps=5", "prompts.openai.tpm=90000",
                                 "prompts.pricing={prompt_per_1m: 1.5, completion_per_1m: 2.0, currency: EUR}"])
    assert stage_hashes(paced) == base
    assert load_config("tiny", ["prompts.pricing={prompt_per_1m: 1.5, completion_per_1m: 2.0}"]).prompts.pricing.currency == "USD"
    assert stage_hashes(load_config("tiny", ["prompts.openai.max_retries=5"]))["prompts"] != base["prompts"]
    # A run recorded while qps was still hashed (qps: 5) stays committed for qps 5.
    recorded_with_qps = load_config("tiny", ["prompts.openai.qps=5"])
    earlier = stage_hashes(recorded_with_qps, pin_unhashed=False)["prompts"]
    assert earlier != base["prompts"] and earlier in accepted_hashes(recorded_with_qps)["prompts"]
    assert earlier not in accepted_hashes(load_config("tiny", ["prompts.openai.qps=2"]))["prompts"]


def test_chat_changes_the_prompt_hash_only_off_its_default():
    base = load_config("tiny").section_hash("skills", "prompts")
    llm = ["prompts.backend=vllm", "prompts.model=some/llm"]
    assert load_config("tiny", [*llm, "prompts.chat=auto"]).section_hash("skills", "prompts") == \
        load_config("tiny", llm).section_hash("skills", "prompts") != base
    assert load_config("tiny", [*llm, "prompts.chat=false"]).section_hash("skills", "prompts") != \
        load_config("tiny", llm).section_hash("skills", "prompts")


@pytest.mark.parametrize("overrides,field", BAD)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert field in str(info.value)


BOUNDS = {  # field: (refused values, accepted values at and inside the bounds)
    "prompts.rouge_threshold": ([0, -0.1, 1.5, 1.0001], [1, 0.3, 0.8, 0.001]),
    "images.max_error_rate": ([-0.1, -1, 1.5, 2], [0, 1, 0.05]),
    "serve.max_images_per_request": ([0, -1], [1, 16]),
}


@pytest.mark.parametrize("field, value", [(f, v) for f, (bad, _) in BOUNDS.items() for v in bad])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [f"{field}={value}"])
    assert f"{field}:" in str(info.value)


@pytest.mark.parametrize("field, value", [(f, v) for f, (_, good) in BOUNDS.items() for v in good])
def test_values_within_the_bounds_are_accepted(field, value):
    section, name = field.split(".")
    assert getattr(getattr(load_config("tiny", [f"{field}={value}"]), section), name) == value


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("nope")


def test_self_extending_config_is_rejected(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(f"extends: {path}\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(path))


def test_cli_rejects_a_bad_config_before_ray_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "selma", "run", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
         "images.steps=-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "images.steps" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_config_show_prints_the_resolved_config():
    result = subprocess.run([sys.executable, "-m", "selma", "config", "show", "--config", "sd2", "images.steps=30"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model: stabilityai/stable-diffusion-2" in result.stdout
    assert "steps: 30" in result.stdout


def test_loading_a_config_does_not_import_ray_or_torch():
    code = ("import sys; from selma.config import load_config; load_config('sdxl'); "
            "print(sorted(m for m in ('ray', 'torch', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_unhashed_fields_never_change_a_stage_hash(monkeypatch):
    from selma.core.config import TrainConfig

    base = load_config("tiny").section_hash("model", "train")
    assert load_config("tiny", ["train.checkpoint_every=3"]).section_hash("model", "train") != base
    monkeypatch.setattr(TrainConfig, "unhashed", frozenset({"checkpoint_every"}))
    without = load_config("tiny").section_hash("model", "train")
    assert load_config("tiny", ["train.checkpoint_every=3"]).section_hash("model", "train") == without
    assert load_config("tiny", ["train.rank=8"]).section_hash("model", "train") != without


def test_a_dotted_section_hashes_one_field_only_off_its_default():
    # A stage that depends on one field of another section (merge on train.seed, say) names it dotted.
    base = load_config("tiny")
    assert base.section_hash("merge", "train.seed") == base.section_hash("merge")
    changed = load_config("tiny", ["train.seed=1"])
    assert changed.section_hash("merge", "train.seed") != base.section_hash("merge")
    assert load_config("tiny", ["train.rank=8"]).section_hash("merge", "train.seed") == base.section_hash("merge")


def test_a_new_section_field_with_a_default_factory_is_omitted_at_its_default(monkeypatch):
    from selma.core.config import TrainConfig

    base = load_config("tiny").section_hash("train")
    monkeypatch.setattr(TrainConfig, "hash_omits_default", frozenset({"target_modules"}))
    omitted = load_config("tiny").section_hash("train")
    assert omitted != base  # target_modules (a default_factory list) left the hash at its default
    assert load_config("tiny", ["train.target_modules=[to_q]"]).section_hash("train") != omitted
