"""The shapes world's base model: its tokenizer, its trainer, and the weights shipped as ``world:base``."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from selma.core.models import resolve_model
from selma.world import KINDS, WorldEvaluator, caption_of, parse_caption, sample_scenes
from selma.world.base import (
    BaseModelConfig,
    build_world_tokenizer,
    shipped_base_model,
    train_base_model,
    training_caption,
)
from selma.world.scene import RELATIONS, Entity, Scene, SceneGraph, WorldObject, sample_scene

TINY_TRAINING = dict(vae_steps=3, vae_batch_size=4, steps=3, batch_size=4, pool_size=64, warmup_steps=1,
                     unet_channels=[16, 32, 32], text_hidden_size=16, log_every=1, threads=1)


V2_WORDS = ["a", "an", "one", "two", "three", "four", "five", "six", "small", "large", "and", "to", "the", "left",
            "right", "of", "above", "below", "red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink",
            "circle", "square", "triangle", "diamond", "cross",
            "circles", "squares", "triangles", "diamonds", "crosses"]


def test_every_world_word_is_one_token():
    tokenizer = build_world_tokenizer()
    for word in V2_WORDS:
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    caption = "Two red circles, a blue square and a green triangle"
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 1 + 2  # the comma, BOS and EOS
    caption = "Six small orange crosses, an orange cross and a large pink diamond"
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 1 + 2
    # The loose training captions too: every word of them is one token.
    config, rng = BaseModelConfig(), np.random.default_rng(1)
    for kind in KINDS:
        for scene in sample_scenes(kind, 40, seed=2):
            caption = training_caption(scene, rng, config)
            assert len(tokenizer(caption).input_ids) == len(caption.split()) + caption.count(",") + 2, caption


def _counting_scene(count: int, size: str | None = None) -> Scene:
    objects = tuple(WorldObject("cross", "orange", 12.0 + 20 * i, 20.0, 13.0 if size == "small" else 19.0)
                    for i in range(count))
    return Scene(objects, SceneGraph((Entity(count, "orange", "cross", say_one=True, size=size),)))


def test_training_captions_drop_and_shorten_at_the_configured_rates():
    config = BaseModelConfig(caption_dropout=0.1, partial_caption_rate=0.3)
    scene = sample_scene("binding", 3)
    rng = np.random.default_rng(0)
    captions = [training_caption(scene, rng, config) for _ in range(4000)]
    assert abs(captions.count("") / 4000 - 0.1) < 0.02
    partial = [c for c in captions if c and c != caption_of(scene)]
    assert abs(len(partial) / 4000 - 0.3) < 0.03
    # One object, named without its size, with the article its colour takes.
    assert set(partial) == {f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in scene.objects}
    single = sample_scene("single", 3)  # one object: its full caption is already exact
    assert {training_caption(single, rng, config) for _ in range(200)} == {"", caption_of(single)}
    orange = _counting_scene(1)  # "one" is a number: a count rate of 0 writes "an orange cross"
    assert {training_caption(orange, rng, BaseModelConfig(count_rate=0.0)) for _ in range(200)} == \
        {"", "one orange cross"}


def test_without_its_count_rate_a_group_is_captioned_as_a_bare_plural():
    rng = np.random.default_rng(0)
    never, always = BaseModelConfig(count_rate=0.0), BaseModelConfig(count_rate=1.0)
    for size, plural in ((None, "orange crosses"), ("small", "small orange crosses")):
        scene = _counting_scene(3, size)
        captions = {training_caption(scene, rng, never) for _ in range(400)}
        assert captions == {"", "an orange cross", plural}  # dropped, one object, or the group without its number
        captions = {training_caption(scene, rng, always) for _ in range(400)}
        assert captions == {"", "an orange cross", caption_of(scene)} and caption_of(scene).startswith("three ")
    multi = Scene((WorldObject("circle", "red", 12, 12, 12), WorldObject("circle", "red", 40, 12, 12),
                   WorldObject("square", "blue", 20, 44, 12)),
                  SceneGraph((Entity(2, "red", "circle"), Entity(1, "blue", "square"))))
    full = {c for c in (training_caption(multi, rng, never) for _ in range(400)) if " and " in c}
    assert full == {"red circles and a blue square"}


def test_without_its_relation_rate_a_spatial_caption_lists_the_objects():
    rng = np.random.default_rng(0)
    scenes = sample_scenes("spatial", 30, seed=4)
    never = BaseModelConfig(relation_rate=0.0, caption_dropout=0.0, partial_caption_rate=0.0)
    for scene in scenes:
        caption = training_caption(scene, rng, never)
        assert not any(relation in caption for relation in RELATIONS), caption
        graph = parse_caption(caption)  # "a red circle and a blue square": binding's form, in the grammar
        assert graph.entities == scene.graph.entities and not graph.relations
    always = BaseModelConfig(relation_rate=1.0, caption_dropout=0.0, partial_caption_rate=0.0)
    assert all(training_caption(scene, rng, always) == caption_of(scene) for scene in scenes)


def test_training_captions_name_counts_and_relations_at_the_configured_rates():
    config, rng, draws = BaseModelConfig(), np.random.default_rng(3), 4000
    whole = 1 - config.caption_dropout - config.partial_caption_rate  # the share captioned whole
    counting, spatial = _counting_scene(3), sample_scene("spatial", 5)
    captions = [training_caption(counting, rng, config) for _ in range(draws)]
    assert abs(captions.count("") / draws - config.caption_dropout) < 0.02
    assert abs(captions.count("three orange crosses") / draws - whole * config.count_rate) < 0.03
    assert abs(captions.count("orange crosses") / draws - whole * (1 - config.count_rate)) < 0.03
    captions = [training_caption(spatial, rng, config) for _ in range(draws)]
    stated = sum(c == caption_of(spatial) for c in captions)
    listed = sum(c == caption_of(spatial).replace(spatial.graph.relations[0].relation, "and") for c in captions)
    assert abs(stated / draws - whole * config.relation_rate) < 0.03
    assert abs(listed / draws - whole * (1 - config.relation_rate)) < 0.03


def _weights(folder, component):
    with safe_open(str(folder / component / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_train_base_model_is_deterministic_and_loads_through_the_ordinary_pipeline(tmp_path):
    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator

    first = train_base_model(tmp_path / "a", BaseModelConfig(**TINY_TRAINING), progress=lambda _: None)
    second = train_base_model(tmp_path / "b", BaseModelConfig(**TINY_TRAINING), progress=lambda _: None)
    for component in ("unet", "vae"):
        a, b = _weights(first, component), _weights(second, component)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        assert {str(t.dtype) for t in a.values()} == {"torch.float16"}
    record = json.loads((first / "world_base.json").read_text())
    assert [entry["step"] for entry in record["log"] if entry["phase"] == "denoiser"] == [1, 2, 3]
    assert record["config"]["steps"] == 3
    generator = ImageGenerator(str(first), ImagesConfig(steps=2, guidance_scale=3.0))
    image = generator.generate(["three red circles"], [0])[0]
    assert image.shape == (64, 64, 3)


def test_the_saved_vae_encodes_deterministically(tmp_path):
    """A posterior sample is its mean: LoRA training samples latents the way the base was trained."""
    import torch
    from diffusers import AutoencoderKL

    folder = train_base_model(tmp_path / "m", BaseModelConfig(**TINY_TRAINING), progress=lambda _: None)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior = vae.encode(pixels).latent_dist
    assert posterior.mean.std() > 0
    assert torch.allclose(posterior.sample(torch.Generator().manual_seed(0)), posterior.mean, atol=1e-5)


def test_a_two_level_vae_gives_32x32_latents_and_the_pipeline_still_draws_64x64(tmp_path):
    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator

    config = BaseModelConfig(**{**TINY_TRAINING, "vae_channels": [16, 32], "latent_channels": 4,
                                "unet_channels": [16, 32, 32, 32], "unet_cross_attention": [False, False, True, False]})
    assert config.latent_size == 32
    folder = train_base_model(tmp_path / "m", config, progress=lambda _: None)
    assert json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == 32
    image = ImageGenerator(str(folder), ImagesConfig(steps=2, guidance_scale=3.0)).generate(["a red circle"], [0])[0]
    assert image.shape == (64, 64, 3)


def test_unet_levels_must_agree():
    with pytest.raises(ValueError, match="unet_cross_attention has 3 levels but unet_channels 4"):
        BaseModelConfig(unet_channels=[16, 32, 32, 32])


def test_train_base_cli_names_a_bad_field():
    result = subprocess.run([sys.executable, "-m", "selma", "world", "train-base", "/tmp/unused", "step=10"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "step: unknown field" in result.stderr


# --------------------------------------------------------------------------- the shipped model


def test_world_base_resolves_to_the_shipped_fp16_pipeline():
    folder = shipped_base_model()
    assert resolve_model("world:base") == str(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {str(t.dtype) for t in _weights(folder, "unet").values()} == {"torch.float16"}
    record = json.loads((folder / "world_base.json").read_text())
    # `selma world train-base DIR threads=2` with the defaults reproduces it.
    assert {k: v for k, v in record["config"].items() if k != "threads"} == {
        k: v for k, v in BaseModelConfig().model_dump().items() if k != "threads"}


@pytest.fixture(scope="module")
def world_generator(one_torch_thread):
    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator

    return ImageGenerator("world:base", ImagesConfig(steps=10, guidance_scale=3.0))


def test_the_shipped_model_draws_held_out_captions_far_above_chance(world_generator):
    """Single objects, counts and bindings of held-out captions, sampled as the world preset does: a
    random or broken model scores ~0 here (the shipped model draws 39%, 27% and 34% of 150 such
    prompts per kind exactly)."""
    evaluator = WorldEvaluator()
    scenes = [scene for kind in ("single", "counting", "binding")
              for scene in sample_scenes(kind, 12, seed=5, split="test")]
    prompts = [caption_of(scene) for scene in scenes]
    images = world_generator.generate(prompts, list(range(len(prompts))))
    correct = [evaluator.prompt_accuracy((np.asarray(image) * 255).round().astype(np.uint8), prompt)
               for image, prompt in zip(images, prompts)]
    assert sum(correct) >= 9, list(zip(prompts, correct))  # 15 of 36 when written
    again = world_generator.generate(prompts[:2], [0, 1])  # the same seeds again, in a smaller batch
    assert np.abs(np.asarray(again) - np.asarray(images[:2])).max() < 1e-4
