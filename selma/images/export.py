"""Hugging Face–friendly views of the image stage's output.

* The Parquet shards carry HF ``datasets`` feature metadata, so
  ``load_dataset("parquet", data_files=...)`` decodes the ``image`` column to PIL images.
* ``images/README.md`` is a dataset card (YAML header as the Hub expects).
* ``export_imagefolder`` writes ``<skill>/<image_id>.png`` + ``metadata.jsonl`` (``file_name``,
  ``text``) for diffusers' training scripts (``--dataset_name imagefolder --caption_column text``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from selma.core.rundir import RunDir, RunDirError

HF_FEATURES = {
    "image_id": {"dtype": "string", "_type": "Value"},
    "prompt_id": {"dtype": "string", "_type": "Value"},
    "skill": {"dtype": "string", "_type": "Value"},
    "prompt": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "width": {"dtype": "int32", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "model": {"dtype": "string", "_type": "Value"},
    "steps": {"dtype": "int32", "_type": "Value"},
    "guidance_scale": {"dtype": "float32", "_type": "Value"},
    # Only in runs with images.truncate_prompts: whether the text encoder cut the row's prompt.
    "prompt_truncated": {"dtype": "bool", "_type": "Value"},
}
OPTIONAL_COLUMNS = ("prompt_truncated",)


def png_column(images: pa.Array | pa.ChunkedArray) -> pa.StructArray:
    """PNG bytes as Hugging Face's Image storage: ``struct<bytes: binary, path: string>``."""
    images = images.combine_chunks() if isinstance(images, pa.ChunkedArray) else images
    return pa.StructArray.from_arrays([images.cast(pa.binary()), pa.nulls(len(images), pa.string())],
                                      names=["bytes", "path"])


def png_bytes_of(value) -> bytes:
    """The PNG bytes of an ``image`` cell (the Image struct, or raw bytes)."""
    return value["bytes"] if isinstance(value, dict) else value


def with_hf_features(table: pa.Table) -> pa.Table:
    """Image column as HF Image storage, plus the ``huggingface`` schema metadata for ``datasets``."""
    if "image" in table.column_names and not pa.types.is_struct(table.schema.field("image").type):
        table = table.set_column(table.column_names.index("image"), "image", png_column(table.column("image")))
    features = {name: HF_FEATURES[name] for name in table.column_names if name in HF_FEATURES}
    metadata = dict(table.schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return table.replace_schema_metadata(metadata)


def dataset_card(config, counts: dict[str, int]) -> str:
    """``images/README.md``: the Hub's YAML header (configs, features, split size) and a summary."""
    images = config.images
    features = {name: f for name, f in HF_FEATURES.items() if name not in OPTIONAL_COLUMNS}
    if images.truncate_prompts:
        features["prompt_truncated"] = HF_FEATURES["prompt_truncated"]
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*/*.parquet"}]}],
        "dataset_info": {
            "features": [{"name": name, **({"dtype": f["dtype"]} if "dtype" in f else {"dtype": "image"})}
                         for name, f in features.items()],
            "splits": [{"name": "train", "num_examples": sum(counts.values())}],
        },
        "task_categories": ["text-to-image"],
        "tags": ["selma", "synthetic"],
    }
    rows = "\n".join(f"| `{skill}` | {count} |" for skill, count in sorted(counts.items()))
    return (
        "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"
        "# SELMA auto-generated image–text pairs\n\n"
        f"Images drawn by `{config.image_model}` for LLM-written, skill-specific prompts "
        f"(prompt backend: `{config.prompts.backend}`), one folder of Parquet shards per skill.\n\n"
        f"Settings: {images.steps} denoising steps, guidance scale {images.guidance_scale}, "
        f"{images.images_per_prompt} image(s) per prompt, resolution "
        f"{images.resolution or 'native'}, negative prompt {images.negative_prompt!r}, seed {images.seed}; "
        "each image's seed is derived from its `image_id`."
        + (" Prompts longer than the text encoder takes were cut to fit (`prompt_truncated`)."
           if images.truncate_prompts else "") + "\n\n"
        "| skill | images |\n|---|---|\n" + rows + "\n\n"
        "```python\nfrom datasets import load_dataset\n"
        "ds = load_dataset(\"parquet\", data_files=\"images/*/*.parquet\", split=\"train\")\n```\n"
    )


def export_imagefolder(run: RunDir, out_dir: str | Path, skills: list[str] | None = None) -> int:
    """Write PNG files and ``metadata.jsonl``; returns the number of images exported."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skills = skills or run.list_dirs("images")
    if not skills:
        raise RunDirError(f"{run.uri}: has no images to export")
    count = 0
    metadata_path = out_dir / "metadata.jsonl"
    temporary = out_dir / ".metadata.jsonl.tmp"
    try:
        with temporary.open("w") as metadata:
            for skill in skills:
                (out_dir / skill).mkdir(exist_ok=True)
                for file in run.list_files("images", skill):
                    for row in _rows(run, file):
                        name = f"{skill}/{row['image_id']}.png"
                        (out_dir / name).write_bytes(png_bytes_of(row["image"]))
                        entry = {"file_name": name, "text": row["prompt"], "skill": skill,
                                 "prompt_id": row["prompt_id"], "image_id": row["image_id"], "seed": row["seed"]}
                        metadata.write(json.dumps(entry) + "\n")
                        count += 1
        os.replace(temporary, metadata_path)
    finally:
        temporary.unlink(missing_ok=True)
    return count


def _rows(run: RunDir, file: str):
    with run.reading_parquet(file):
        for batch in pq.ParquetFile(file, filesystem=run.fs).iter_batches(batch_size=64):
            yield from batch.to_pylist()
