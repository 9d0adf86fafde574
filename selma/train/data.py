"""Ray Data preprocessing for training, run on CPUs: PNG decoding, crop/flip, tokenisation."""

from __future__ import annotations

import functools
import io
import logging

import numpy as np


def prepare_training_batch(batch: dict[str, np.ndarray], *, model: str, resolution: int, random_crop: bool = True,
                           random_flip: bool = True) -> dict[str, np.ndarray]:
    """``map_batches`` function (fused with the Parquet read into one task, holding no actor)."""
    return _preparer(model, resolution, random_crop, random_flip)(batch)


@functools.lru_cache(maxsize=4)
def _preparer(model: str, resolution: int, random_crop: bool, random_flip: bool) -> "PrepareTrainingBatch":
    return PrepareTrainingBatch(model, resolution, random_crop, random_flip)


class PrepareTrainingBatch:
    """Image rows in, model-ready arrays out; loads the tokenizer(s) once per process.

    Rows whose PNG cannot be decoded are dropped with a warning.
    """

    def __init__(self, model: str, resolution: int, random_crop: bool = True, random_flip: bool = True):
        from transformers import AutoTokenizer

        from selma.models.tiny import resolve_model

        path = resolve_model(model)
        self.tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
        try:
            self.tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        except (OSError, ValueError):
            pass
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.rng = np.random.default_rng()

    def _image(self, data: bytes) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        from PIL import Image

        if isinstance(data, dict):  # Hugging Face Image storage: {"bytes", "path"}
            data = data["bytes"]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        original = (image.height, image.width)
        scale = self.resolution / min(image.size)
        if scale != 1:
            image = image.resize((max(self.resolution, round(image.width * scale)),
                                  max(self.resolution, round(image.height * scale))), Image.BILINEAR)
        spare_h, spare_w = image.height - self.resolution, image.width - self.resolution
        if self.random_crop:
            top, left = int(self.rng.integers(0, spare_h + 1)), int(self.rng.integers(0, spare_w + 1))
        else:
            top, left = spare_h // 2, spare_w // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if self.random_flip and self.rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)), original, (top, left)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, prompts, time_ids = [], [], []
        for data, prompt in zip(batch["image"], batch["prompt"]):
            try:
                array, original, corner = self._image(data)
            except Exception as err:
                logging.getLogger(__name__).warning("skipping an undecodable image (%s): %r", err, prompt)
                continue
            pixels.append(array)
            prompts.append(str(prompt))
            time_ids.append([*original, *corner, self.resolution, self.resolution])
        out = {"pixel_values": np.stack(pixels) if pixels else np.zeros((0, 3, self.resolution, self.resolution), np.float32)}
        for tokenizer, key in zip(self.tokenizers, ("input_ids", "input_ids_2")):
            out[key] = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                 truncation=True, return_tensors="np").input_ids.astype(np.int64)
        if len(self.tokenizers) > 1:
            out["add_time_ids"] = np.asarray(time_ids, dtype=np.float32).reshape(-1, 6)
        return out
