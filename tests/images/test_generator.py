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


def _draw_rows(settings: ImagesConfig, prompts: list[str]) -> dict:
    from selma.images.stage import GenerateImages

    n = len(prompts)
    batch = {"image_id": np.array([f"i{k}" for k in range(n)], dtype=object),
             "prompt_id": np.array([f"p{k}" for k in range(n)], dtype=object),
             "skill": np.array(["coco"] * n, dtype=object), "prompt": np.array(prompts, dtype=object),
             "seed": np.arange(n, dtype=np.int64)}
    return GenerateImages("tiny:sd", settings, num_threads=1)(batch)


def test_with_truncate_prompts_a_long_prompt_is_drawn_and_its_row_says_it_was_cut():
    long_prompt = " ".join(["apple"] * 200)
    refused = _draw_rows(ImagesConfig(steps=2), [PROMPTS[0], long_prompt])
    assert refused["error"][0] is None and "tokens" in refused["error"][1] and refused["image"][1] is None
    assert "prompt_truncated" not in refused  # the image contract is unchanged without truncation
    drawn = _draw_rows(ImagesConfig(steps=2, truncate_prompts=True), [PROMPTS[0], long_prompt])
    assert list(drawn["error"]) == [None, None] and all(image is not None for image in drawn["image"])
    assert drawn["prompt_truncated"].tolist() == [False, True]
    # The text encoder saw the long prompt cut at its limit: the image is that of the cut prompt.
    tokenizer_limit = 77 - 2  # words beside the start and end tokens
    cut = " ".join(["apple"] * tokenizer_limit)
    assert _draw_rows(ImagesConfig(steps=2, truncate_prompts=True), [PROMPTS[0], cut])["image"][1] == drawn["image"][1]


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
    import torch
    from lora_helpers import write_random_lora

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


def test_truncated_rows_are_written_with_their_column_and_load_with_hugging_face_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import yaml

    from selma.config import load_config
    from selma.core.rundir import RunDir
    from selma.images.export import dataset_card
    from selma.images.stage import _image_sink

    drawn = _draw_rows(ImagesConfig(steps=2, truncate_prompts=True), [PROMPTS[0], " ".join(["apple"] * 200)])
    run = RunDir(str(tmp_path / "run"))
    _image_sink(run.uri).write([pa.table({k: list(v) for k, v in drawn.items()})], None)
    shards = [str(p) for p in (tmp_path / "run" / "images").glob("*/*.parquet")]
    rows = datasets.load_dataset("parquet", data_files=shards, split="train")
    assert sorted(zip(rows["prompt_id"], rows["prompt_truncated"])) == [("p0", False), ("p1", True)]
    card = dataset_card(load_config("tiny", ["images.truncate_prompts=true"]), {"coco": 2})
    features = yaml.safe_load(card.split("---\n")[1])["dataset_info"]["features"]
    assert {"name": "prompt_truncated", "dtype": "bool"} in features and "`prompt_truncated`" in card
    plain = yaml.safe_load(dataset_card(load_config("tiny"), {"coco": 2}).split("---\n")[1])
    assert "prompt_truncated" not in [f["name"] for f in plain["dataset_info"]["features"]]
