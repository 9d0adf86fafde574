import numpy as np
import pytest

from selma.core.config import ImagesConfig
from selma.images.generator import ImageGenerator, png_bytes

PROMPTS = ["two red apples on a table", "a dog under a blue chair"]


@pytest.fixture(scope="module")
def generator():
    import torch

    torch.set_num_threads(1)
    return ImageGenerator("tiny:sd", ImagesConfig(steps=3, guidance_scale=7.5), device="cpu")


def test_same_seeds_give_identical_pngs_across_generators(generator):
    other = ImageGenerator("tiny:sd", ImagesConfig(steps=3, guidance_scale=7.5), device="cpu")
    first = [png_bytes(i) for i in generator.generate(PROMPTS, [1, 2])]
    again = [png_bytes(i) for i in other.generate(PROMPTS, [1, 2])]
    assert first == again
    changed = [png_bytes(i) for i in generator.generate(PROMPTS, [1, 3])]
    assert changed[0] == first[0] and changed[1] != first[1]


def test_images_have_the_native_or_requested_size(generator):
    assert generator.resolution == 64
    assert generator.generate(PROMPTS[:1], [0])[0].shape == (64, 64, 3)
    assert generator.generate(PROMPTS[:1], [0], size=32)[0].shape == (32, 32, 3)


def test_a_prompt_the_text_encoder_would_truncate_is_refused(generator):
    with pytest.raises(ValueError, match="tokens"):
        generator.generate([" ".join(["apple"] * 200)], [0])


def test_speed_options_do_not_change_the_images(generator):
    settings = ImagesConfig(steps=3, guidance_scale=7.5, channels_last=True, vae_slicing=True)
    optimized = ImageGenerator("tiny:sd", settings, device="cpu")
    np.testing.assert_allclose(optimized.generate(PROMPTS, [5, 6]), generator.generate(PROMPTS, [5, 6]), atol=1e-4)


def test_negative_prompt_changes_the_image(generator):
    plain = generator.generate(PROMPTS[:1], [9])[0]
    negated = generator.generate(PROMPTS[:1], [9], negative_prompt="blurry, red")[0]
    assert not np.allclose(plain, negated)


def test_sdxl_family_pipelines_generate_too():
    sdxl = ImageGenerator("tiny:sdxl", ImagesConfig(steps=2, guidance_scale=5.0), device="cpu")
    images = sdxl.generate(PROMPTS, [1, 2])
    assert [i.shape for i in images] == [(64, 64, 3)] * 2
    assert [png_bytes(i) for i in sdxl.generate(PROMPTS, [1, 2])] == [png_bytes(i) for i in images]
    # Another batch composition changes pixels only by float rounding.
    np.testing.assert_allclose(sdxl.generate(PROMPTS[:1], [1])[0], images[0], atol=1e-3)


def test_a_lora_folder_is_fused_in_as_plain_diffusers_would(generator, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
    from lora_helpers import write_random_lora

    import torch

    from selma.images.generator import load_pipeline

    lora = write_random_lora("tiny:sd", tmp_path / "lora")
    with_lora = ImageGenerator("tiny:sd", generator.settings, device="cpu", lora=lora)
    drawn = with_lora.generate(["a red cube"], [7])[0]
    plain = load_pipeline("tiny:sd", device="cpu")
    plain.load_lora_weights(lora)
    reference = plain(prompt=["a red cube"], num_inference_steps=generator.settings.steps,
                      guidance_scale=generator.settings.guidance_scale,
                      generator=[torch.Generator().manual_seed(7)], output_type="np").images[0]
    assert np.abs(drawn - reference).max() < 2 / 255
    assert np.abs(drawn - generator.generate(["a red cube"], [7])[0]).max() > 0.05
