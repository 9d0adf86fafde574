"""Ray Data preprocessing for training, run on CPUs: Parquet reading, PNG decoding, crop/flip, tokenisation.

All epochs stream from one Ray Data execution: the source is a plan of (file, epoch) items, each read
with pyarrow by :func:`read_and_prepare` and re-augmented every time it comes round. (``read_parquet``
over a repeated file list would not do: it reads each distinct path once.)
"""

from __future__ import annotations

import functools
import io

import numpy as np

from selma.core.models import resolve_model
from selma.core.rundir import RunDir

# transformers and PIL are imported where used, in the Ray Data tasks that decode and tokenise.

TARGET_BLOCK_BYTES = 32 << 20


def rows_per_block(resolution: int, batch_size: int) -> int:
    """Rows per prepared block: about 32 MB of fp32 pixels, and at least one micro-batch. Tiny blocks
    cost more in Ray Data's per-block overhead than in decoding."""
    return max(batch_size, TARGET_BLOCK_BYTES // (3 * resolution * resolution * 4))


def epoch_plan(files: list[str], epochs: int, seed: int) -> list[dict]:
    """``epochs`` passes over ``files``, each in its own seeded order."""
    rng = np.random.default_rng(seed)
    return [{"path": files[i], "epoch": epoch} for epoch in range(epochs) for i in rng.permutation(len(files))]


def read_and_prepare(items: dict[str, np.ndarray], *, run_uri: str, model: str, resolution: int, rows_per_batch: int,
                     random_crop: bool = True, random_flip: bool = True, report_skipped=None):
    """``map_batches`` generator: the rows of the planned files, in prepared batches of ``rows_per_batch``
    (files may share a batch).

    Undecodable images are left out; ``report_skipped(rows)`` hears of them (``skill``, ``image_id``,
    ``problem`` each), once per pass.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem = RunDir(run_uri).fs
    prepare = _preparer(model, resolution, random_crop, random_flip)
    pending: list = []
    pending_rows = 0

    def flush():
        nonlocal pending_rows
        table = pa.Table.from_batches(pending)
        pending.clear()
        pending_rows = 0
        prepared, skipped = prepare(table.to_pydict())
        if skipped and report_skipped is not None:
            report_skipped(skipped)
        return prepared

    for path in items["path"]:
        with filesystem.open_input_file(str(path)) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=rows_per_batch,
                                                         columns=["image_id", "skill", "image", "prompt"])
            for record_batch in batches:
                pending.append(record_batch)
                pending_rows += record_batch.num_rows
                if pending_rows >= rows_per_batch:
                    yield flush()
    if pending:
        yield flush()


@functools.lru_cache(maxsize=4)
def _preparer(model: str, resolution: int, random_crop: bool, random_flip: bool) -> "PrepareTrainingBatch":
    return PrepareTrainingBatch(model, resolution, random_crop, random_flip)


class PrepareTrainingBatch:
    """Image rows in, model-ready arrays out; loads the tokenizer(s) once per process.

    Rows whose PNG cannot be decoded are left out and returned as skipped rows. Other sizes and
    modes are converted: RGB, shorter side resized to ``resolution``, then a (random) square crop.
    """

    def __init__(self, model: str, resolution: int, random_crop: bool = True, random_flip: bool = True):
        from transformers import AutoTokenizer

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

    def __call__(self, batch: dict) -> tuple[dict[str, np.ndarray], list[dict]]:
        """Prepared arrays for the decodable rows of ``batch``, and the skipped rows."""
        pixels, prompts, time_ids, skipped = [], [], [], []
        for index, (data, prompt) in enumerate(zip(batch["image"], batch["prompt"])):
            try:
                array, original, corner = self._image(data)
            except Exception as err:
                skipped.append({"skill": str(batch.get("skill", [""] * (index + 1))[index]),
                                "image_id": str(batch.get("image_id", [""] * (index + 1))[index]),
                                "problem": f"undecodable image: {type(err).__name__}: {err}"})
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
        return out, skipped
