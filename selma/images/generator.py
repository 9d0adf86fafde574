"""Text-to-image generation with diffusers (Ray-free core).

Any prompt→image pipeline that ``DiffusionPipeline.from_pretrained`` loads works (SD 1.x, 2.x,
SDXL, ...). Each image has its own ``torch.Generator`` seeded from its ``image_id``, so an image
does not depend on which other prompts shared its batch's initial noise.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from selma.core.models import resolve_model
from selma.core.vae import load_vae

# torch and diffusers are imported where used: every stage module is imported by the pipeline, and
# the vLLM venv that runs the prompt stage has neither diffusers nor peft.

if TYPE_CHECKING:
    from selma.core.config import ImagesConfig

# The ImagesConfig fields an ImageGenerator reads: with the model, a LoRA and the seeds, they decide
# the images it draws (eval keys its drawn images on them).
GENERATOR_FIELDS = frozenset({"steps", "guidance_scale", "resolution", "negative_prompt", "dtype", "channels_last",
                              "compile", "vae_slicing", "vae_tiling", "truncate_prompts"})


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _has_component(path: str, component: str) -> bool:
    index = Path(path) / "model_index.json"
    if not index.exists():
        return True  # a hub id: let diffusers decide
    return component in json.loads(index.read_text())


def load_pipeline(model: str, *, dtype: str = "auto", device: str | None = None, vae: str | None = None):
    """Load a text-to-image pipeline from a path, hub id or ``tiny:`` spec, safety checker off;
    ``vae`` (a folder or hub id) replaces the pipeline's own VAE."""
    from diffusers import DiffusionPipeline

    device = device or default_device()
    path = resolve_model(model)
    extra = {"safety_checker": None, "requires_safety_checker": False} if _has_component(path, "safety_checker") else {}
    if vae is not None:
        extra["vae"] = load_vae(vae, torch_dtype(dtype, device))
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype(dtype, device), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png_bytes(image: np.ndarray) -> bytes:
    """An HxWx3 float image in [0, 1] as PNG bytes."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def load_adapter(pipe, lora_dir: str, name: str) -> None:
    """Load a diffusers-format LoRA into ``pipe`` as adapter ``name``; refuse one that matches nothing."""
    pipe.load_lora_weights(lora_dir, adapter_name=name)
    # load_lora_weights only warns when no key matches (e.g. a raw peft folder): refuse instead.
    if name not in {adapter for names in pipe.get_list_adapters().values() for adapter in names}:
        raise RuntimeError(f"no LoRA weights in {lora_dir} match the pipeline's modules")


class ImageGenerator:
    """Loads a pipeline once (with a LoRA fused in when ``lora`` names a folder, and the VAE ``vae``
    in place of its own when given) and draws seeded images for batches of prompts, as the
    ``settings`` (an ``images`` config section) say."""

    def __init__(self, model: str, settings: ImagesConfig, *, device: str | None = None,
                 lora: str | None = None, vae: str | None = None):
        self.model = model
        self.settings = settings
        self.device = device or default_device()
        self.pipe = load_pipeline(model, dtype=settings.dtype, device=self.device, vae=vae)
        if lora:
            load_adapter(self.pipe, lora, "selma")
            self.pipe.fuse_lora(adapter_names=["selma"], lora_scale=1.0)
            self.pipe.unload_lora_weights()
        self._optimize(settings)

    def _optimize(self, settings: ImagesConfig) -> None:
        """Speed-ups that leave the sampled images unchanged up to float rounding.

        Attention already runs through PyTorch's scaled_dot_product_attention (diffusers' default
        processor on torch ≥ 2).
        """
        import torch

        pipe = self.pipe
        if settings.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if settings.vae_slicing:
            pipe.vae.enable_slicing()
        if settings.vae_tiling:
            pipe.vae.enable_tiling()
        if settings.compile:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)

    def prompt_overflows(self, prompts: list[str]) -> list[str | None]:
        """For each prompt, why a text encoder of the pipeline would cut it (its length in tokens
        and the limit), or None when every one takes it whole."""
        tokenizers = [tokenizer for tokenizer in (getattr(self.pipe, "tokenizer", None),
                                                  getattr(self.pipe, "tokenizer_2", None)) if tokenizer is not None]
        reasons = []
        for prompt in prompts:
            reason = None
            for tokenizer in tokenizers:
                limit = tokenizer.model_max_length
                length = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
                if length > limit:
                    reason = f"prompt is {length} tokens; the text encoder takes at most {limit}"
                    break
            reasons.append(reason)
        return reasons

    def check_prompt_lengths(self, prompts: list[str]) -> None:
        """Refuse prompts the text encoder would silently truncate (unless ``truncate_prompts``)."""
        if self.settings.truncate_prompts:
            return
        for reason in self.prompt_overflows(prompts):
            if reason:
                raise ValueError(reason)

    @property
    def resolution(self) -> int:
        if self.settings.resolution:
            return self.settings.resolution
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def generate(self, prompts: list[str], seeds: list[int], *, steps: int | None = None,
                 guidance_scale: float | None = None, size: int | None = None,
                 negative_prompt: str | None = None) -> list[np.ndarray]:
        """HxWx3 float images in [0, 1], one per prompt; raises if any image is not finite."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        settings = self.settings
        size = size or self.resolution
        negative = negative_prompt if negative_prompt is not None else settings.negative_prompt
        self.check_prompt_lengths(prompts)
        generators = [torch.Generator(device=self.device).manual_seed(int(seed)) for seed in seeds]
        with torch.inference_mode():
            result = self.pipe(
                prompt=list(prompts),
                negative_prompt=[negative] * len(prompts) if negative else None,
                num_inference_steps=steps or settings.steps,
                guidance_scale=settings.guidance_scale if guidance_scale is None else guidance_scale,
                height=size,
                width=size,
                generator=generators,
                output_type="np",
            )
        images = list(result.images)
        bad = [i for i, image in enumerate(images) if not np.isfinite(image).all()]
        if bad:
            raise FloatingPointError(f"non-finite pixels in images {bad} of the batch")
        return images


def native_resolution(model: str) -> int:
    """The pipeline's default image size, read from its configs without loading weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = resolve_model(model)
    unet = UNet2DConditionModel.load_config(path, subfolder="unet")
    vae = AutoencoderKL.load_config(path, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
