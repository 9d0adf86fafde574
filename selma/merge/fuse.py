"""A merged LoRA fused into a full pipeline: ``W = W0 + ΔW`` baked into the UNet, saved with ``save_pretrained``.

The plain diffusers path, nothing custom: ``from_pretrained`` (fp32, CPU) → ``load_lora_weights`` →
``fuse_lora`` → ``unload_lora_weights`` → ``save_pretrained``. Loading is checked (diffusers only warns when no
key matches, and the result would silently be the base model), and shapes are checked before loading, so a
LoRA of another base model fails with an error naming the layer.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from selma.core.models import resolve_model
from selma.core.vae import load_vae
from selma.merge.errors import MergeError
from selma.merge.lora_io import LoraFile

# torch and diffusers are imported in the functions that use them (cheap import): selma.merge.methods
# imports this module, and selma.config and `selma --help` import that one.

ADAPTER_NAME = "selma_merged"
SAVE_DTYPES = ("float32", "float16", "bfloat16")


def fuse_into_pipeline(
    model: str,
    lora_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    vae: str | None = None,
) -> Path:
    """Fuse the LoRA in ``lora_dir`` into the pipeline ``model`` (path, hub id or ``tiny:`` spec) and save it,
    with the VAE ``vae`` (folder or hub id) in place of the model's own when given.

    Fusing happens in fp32 on CPU; ``dtype`` ("float32", "float16", "bfloat16") is the dtype saved. The
    pipeline is written next to ``out_dir`` and renamed into place, so ``out_dir`` is never half-written.
    Returns ``out_dir``.
    """
    import torch

    if dtype not in SAVE_DTYPES:
        raise MergeError(f"fused pipeline dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    with LoraFile(lora_dir) as lora_file:
        shapes = dict(lora_file.shapes)

    pipe = _load_cpu_pipeline(model, vae)
    _check_fits(pipe.unet, shapes, model, lora_dir)
    pipe.load_lora_weights(str(lora_dir), adapter_name=ADAPTER_NAME)
    loaded = {
        name for name, module in pipe.unet.named_modules()
        if ADAPTER_NAME in getattr(module, "lora_A", {})
    }
    if loaded != set(shapes):
        missing = sorted(set(shapes) - loaded)
        raise MergeError(
            f"diffusers loaded the LoRA {lora_dir} into {len(loaded)} of {len(shapes)} UNet layers of {model}; "
            f"not loaded e.g. {missing[:3]}"
        )
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    if dtype != "float32":
        pipe.to(dtype=getattr(torch, dtype))

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex}")
    try:
        pipe.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _load_cpu_pipeline(model: str, vae: str | None = None):
    """``model`` in fp32 on CPU, safety checker off: what :func:`selma.images.generator.load_pipeline` loads,
    without importing the image stage (and its libraries) here."""
    import torch
    from diffusers import DiffusionPipeline

    path = resolve_model(model)
    index = Path(path) / "model_index.json"
    has_safety_checker = not index.exists() or "safety_checker" in json.loads(index.read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if has_safety_checker else {}
    if vae is not None:
        extra["vae"] = load_vae(vae, torch.float32)
    return DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, **extra)


def _check_fits(unet, shapes: dict[str, tuple[int, int]], model: str, lora_dir) -> None:
    for name, (out_features, in_features) in sorted(shapes.items()):
        try:
            module = unet.get_submodule(name)
        except AttributeError:
            raise MergeError(f"the LoRA {lora_dir} adapts UNet layer {name}, which {model} does not have") from None
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != (out_features, in_features):
            got = tuple(weight.shape) if weight is not None else None
            raise MergeError(
                f"the LoRA {lora_dir} does not fit {model}: layer {name} is {got} there, "
                f"the LoRA expects {(out_features, in_features)} (another base model?)"
            )
