"""The shapes world's base model: its tokenizer, its trainer, and the weights shipped as ``world:base``."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from selma.core.models import resolve_model
from selma.world import WorldEvaluator, caption_of, sample_scenes
from selma.world.base import (
    BaseModelConfig,
    build_world_tokenizer,
    shipped_base_model,
    train_base_model,
    training_caption,
)
from selma.world.scene import COLORS, SHAPES, sample_scene

TINY_TRAINING = dict(vae_steps=3, vae_batch_size=4, steps=3, batch_size=4, pool_size=64, warmup_steps=1,
                     unet_channels=[16, 32, 32], text_hidden_size=16, log_every=1, threads=1)


def test_every_world_word_is_one_token():
    tokenizer = build_world_tokenizer()
    words = ["a", "one", "two", "three", "four", "and", "to", "the", "left", "right", "of", "above", "below",
             *COLORS, *SHAPES, *(f"{shape}s" for shape in SHAPES)]
    for word in words:
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    caption = "Two red circles, a blue square and a green triangle"
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 1 + 2  # the comma, BOS and EOS


def test_training_captions_drop_and_shorten_at_the_configured_rates():
    config = BaseModelConfig(caption_dropout=0.1, partial_caption_rate=0.3)
    scene = sample_scene("binding", 3)
    rng = np.random.default_rng(0)
    captions = [training_caption(scene, rng, config) for _ in range(4000)]
    assert abs(captions.count("") / 4000 - 0.1) < 0.02
    partial = [c for c in captions if c and c != caption_of(scene)]
    assert abs(len(partial) / 4000 - 0.3) < 0.03
    assert set(partial) == {f"a {o.color} {o.shape}" for o in scene.objects}
    single = sample_scene("single", 3)  # one object: its full caption is already exact
    assert {training_caption(single, rng, config) for _ in range(200)} == {"", caption_of(single)}


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
    assert record["seconds"]["total"] < 60 * 60  # trained within the hour on 2 CPU cores


@pytest.fixture(scope="module")
def world_generator(one_torch_thread):
    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator

    return ImageGenerator("world:base", ImagesConfig(steps=20, guidance_scale=4.0))


def test_the_shipped_model_draws_held_out_captions_far_above_chance(world_generator):
    """Single objects and counts of held-out captions: a random or broken model scores ~0 here."""
    evaluator = WorldEvaluator()
    scenes = sample_scenes("single", 12, seed=5, split="test") + sample_scenes("counting", 12, seed=5, split="test")
    prompts = [caption_of(scene) for scene in scenes]
    images = world_generator.generate(prompts, list(range(len(prompts))))
    correct = [evaluator.prompt_accuracy((np.asarray(image) * 255).round().astype(np.uint8), prompt)
               for image, prompt in zip(images, prompts)]
    assert sum(correct) >= 8, list(zip(prompts, correct))
    again = world_generator.generate(prompts[:2], [0, 1])  # the same seeds again, in a smaller batch
    assert np.abs(np.asarray(again) - np.asarray(images[:2])).max() < 1e-4
