"""The top-level ``vae`` override, Ray-free: it replaces the model's VAE where ``model`` is loaded
(images, train, serve, eval keys, the fused pipeline), it is checked before any cluster work, and it
enters the images and train hashes only when set."""

import json

import numpy as np
import pytest
import torch

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.core.vae import check_vae
from selma.models.tiny import build_tiny_pipeline
from selma.pipeline import stage_hashes


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory) -> str:
    """A second tiny VAE: the tiny builder's, from another seed, saved on its own."""
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("seed1"), "sd", seed=1)
    return str(folder / "vae")


def _vae_weights(vae) -> dict:
    return {k: v.detach().float().clone() for k, v in vae.state_dict().items()}


def _assert_weights_equal(module, folder: str) -> None:
    from diffusers import AutoencoderKL

    expected = _vae_weights(AutoencoderKL.from_pretrained(folder))
    got = _vae_weights(module)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_the_override_is_a_different_vae_of_the_same_shape(other_vae):
    from diffusers import AutoencoderKL

    from selma.core.models import resolve_model

    own = _vae_weights(AutoencoderKL.from_pretrained(resolve_model("tiny:sd"), subfolder="vae"))
    other = _vae_weights(AutoencoderKL.from_pretrained(other_vae))
    assert sorted(own) == sorted(other) and any(not torch.equal(own[k], other[k]) for k in own)


def test_the_image_generator_draws_with_the_override(other_vae):
    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator

    settings = ImagesConfig(steps=2, guidance_scale=7.5)
    plain = ImageGenerator("tiny:sd", settings, device="cpu")
    overridden = ImageGenerator("tiny:sd", settings, device="cpu", vae=other_vae)
    _assert_weights_equal(overridden.pipe.vae, other_vae)
    for name in ("unet", "text_encoder"):  # the rest of the pipeline is the model's
        ours, theirs = getattr(plain.pipe, name).state_dict(), getattr(overridden.pipe, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    image, other_image = plain.generate(["a red apple"], [3])[0], overridden.generate(["a red apple"], [3])[0]
    assert image.shape == other_image.shape and np.abs(image - other_image).max() > 1e-3


def test_training_components_encode_with_the_override(other_vae):
    from selma.core.config import TrainConfig
    from selma.train.step import load_training_components

    train = TrainConfig(rank=4, alpha=4, batch_size=2, effective_batch_size=2, strategy="ddp", mixed_precision="no")
    components = load_training_components("tiny:sd", train, vae=other_vae)
    _assert_weights_equal(components.vae, other_vae)
    assert not any(p.requires_grad for p in components.vae.parameters())


def test_the_serving_model_and_the_fused_pipeline_carry_the_override(other_vae, tmp_path):
    from selma.merge.fuse import fuse_into_pipeline
    from selma.serve.app import ImageModel
    from tests.lora_helpers import write_random_lora

    served = ImageModel(base_model="tiny:sd", adapters={}, default_steps=2, guidance_scale=7.5, max_batch_size=1,
                        batch_wait_timeout_s=0.1, cpus=1, vae=other_vae)
    _assert_weights_equal(served.generator.pipe.vae, other_vae)
    lora = write_random_lora("tiny:sd", tmp_path / "lora")
    fused = fuse_into_pipeline("tiny:sd", lora, tmp_path / "fused", vae=other_vae)
    _assert_weights_equal(_load(fused / "vae"), other_vae)


def _load(folder):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder)


def test_jobs_and_stages_take_the_override_but_not_for_another_image_model(other_vae, tmp_path):
    from selma.core.rundir import RunDir
    from selma.train.experts import ExpertJob, model_card

    config = load_config("tiny", [f"vae={other_vae}"])
    assert config.vae == other_vae and config.image_vae == other_vae
    job = ExpertJob.from_config(config, "coco", RunDir(str(tmp_path / "run")), resolution=64)
    assert job.vae == other_vae and f'"vae": "{other_vae}"' in model_card(job, [])
    assert ExpertJob.from_config(load_config("tiny"), "coco", RunDir(str(tmp_path / "run")), resolution=64).vae is None
    weak_to_strong = load_config("tiny", [f"vae={other_vae}", "images.model=tiny:sd@128"])
    assert weak_to_strong.image_vae is None and weak_to_strong.vae == other_vae
    same = load_config("tiny", [f"vae={other_vae}", "images.model=tiny:sd"])
    assert same.image_vae == other_vae


def test_the_hash_changes_with_the_override_and_not_without_it(other_vae):
    from selma.images.stage import ImageStage
    from selma.train.experts import TrainStage

    plain, overridden = load_config("tiny"), load_config("tiny", [f"vae={other_vae}"])
    assert plain.section_hash("model", "vae", "images") == plain.section_hash("model", "images")
    assert plain.section_hash("model", "vae", "train") == plain.section_hash("model", "train")
    for stage in (ImageStage, TrainStage):  # each stage's own sections, not only through the chain
        assert plain.section_hash(*stage.sections) != overridden.section_hash(*stage.sections)
    before, after = stage_hashes(plain), stage_hashes(overridden)
    assert before["prompts"] == after["prompts"]
    assert before["images"] != after["images"] and before["train"] != after["train"]
    assert stage_hashes(load_config("tiny", ["vae=null"])) == before


def test_eval_images_are_keyed_on_the_override_only_when_it_is_set(other_vae):
    from selma.eval.run import EvalModel, _key, generation_settings, images_key
    from selma.images.generator import GENERATOR_FIELDS

    base = EvalModel(name="base", lora=None)
    plain, overridden = load_config("tiny"), load_config("tiny", [f"vae={other_vae}"])
    assert images_key(plain, base, "dsg") != images_key(overridden, base, "dsg")
    drawn_with = generation_settings(plain).model_dump(include=GENERATOR_FIELDS)
    drawn_with["truncate_long_prompts"] = drawn_with.pop("truncate_prompts")  # keyed under its old name
    assert images_key(plain, base, "dsg") == _key(plain.model, None, drawn_with, plain.eval.seed, "dsg")


def test_a_bad_override_fails_every_preflight_naming_vae(tmp_path, other_vae):
    from diffusers import AutoencoderKL

    from selma.core.rundir import RunDir
    from selma.images.stage import ImageStage
    from selma.merge.stage import MergeStage
    from selma.train.experts import preflight_train

    run = RunDir(str(tmp_path / "run"))
    missing = load_config("tiny", [f"vae={tmp_path / 'nowhere'}"])
    for preflight in (ImageStage().preflight, lambda config, _: preflight_train(config)):
        with pytest.raises(ConfigError, match=r"^vae: cannot load an AutoencoderKL config from .*nowhere"):
            preflight(missing, run)
    with pytest.raises(ConfigError, match="^vae: "):
        MergeStage().preflight(missing.model_copy(update={"merge": missing.merge.model_copy(
            update={"fused_pipeline": True})}), run)
    MergeStage().preflight(missing, run)  # no fused pipeline: the VAE is not used

    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps(dict(AutoencoderKL.load_config(other_vae))))
    with pytest.raises(ConfigError, match="vae: .* holds no safetensors weights"):
        check_vae(str(weightless), "tiny:sd")

    wide = AutoencoderKL(latent_channels=8, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"vae: .* has 8 latent channels, the VAE of tiny:sd has 4"):
        check_vae(str(tmp_path / "wide"), "tiny:sd")
    check_vae(other_vae, "tiny:sd")
    check_vae(None, "tiny:sd")
    weak_to_strong = load_config("tiny", [f"vae={tmp_path / 'nowhere'}", "images.model=tiny:sdxl"])
    ImageStage().preflight(weak_to_strong, run)  # the images are another model's: the override is not used
