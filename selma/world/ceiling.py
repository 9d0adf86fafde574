"""How far can perfect data move a world model at all? (``selma world ceiling``)

Calibration asks whether experts trained on ground-truth renders beat the base model. When no
LoRA recipe does, the question is whether any recipe could: this fine-tunes *every* weight of
the UNet (and, by default, the text encoder) on ground-truth renders of one kind's train-split
captions and scores held-out prompts of that kind with the exact evaluator along the way. A LoRA
expert updates a subset of these weights, so what full fine-tuning does not reach in a budget of
steps, no recipe of that budget is expected to reach either. Nothing is saved but the scores.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selma.core.models import resolve_model
from selma.core.scoring import mean_and_stderr
from selma.train.recipe import noise_prediction_loss
from selma.world.base import encode_captions, encode_scenes
from selma.world.captions import caption_of, sample_scenes
from selma.world.evaluator import WorldEvaluator
from selma.world.scene import KINDS


class CeilingConfig(BaseModel):
    """``selma world ceiling`` settings; every field can be given as ``key=value``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("world:base", description="a world model (world:base, world:small) or a pipeline folder")
    kind: str = Field("counting", description=f"one of {', '.join(KINDS)}")
    steps: int = Field(600, ge=1)
    score_every: int = Field(300, ge=1, description="score the held-out prompts every this many steps (and at 0)")
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    text_encoder: bool = Field(True, description="fine-tune the text encoder too (a UNet LoRA does not)")
    scenes: int = Field(4000, ge=1, description="ground-truth train-split scenes rendered once")
    caption_dropout: float = Field(0.1, ge=0, le=1)
    snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR loss weighting, as the base was trained; None: MSE")
    prompts: int = Field(100, ge=1, description="held-out test-split prompts scored")
    image_seeds: int = Field(2, ge=1)
    sampling_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    seed: int = 0
    threads: int | None = Field(None, ge=1)

    @field_validator("kind")
    @classmethod
    def _a_world_kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"{kind!r} is not a world kind; expected one of {', '.join(KINDS)}")
        return kind


def score_prompts(pipe, prompts: list[str], config: CeilingConfig) -> dict:
    """Prompt accuracy (mean and s.e. over prompts) of ``pipe`` on ``prompts``, ``image_seeds`` images each."""
    evaluator, per_prompt = WorldEvaluator(), np.zeros(len(prompts))
    with torch.no_grad():
        for image_seed in range(config.image_seeds):
            for start in range(0, len(prompts), 50):
                batch = prompts[start:start + 50]
                generators = [torch.Generator().manual_seed(image_seed * 100_000 + start + i) for i in range(len(batch))]
                images = pipe(batch, num_inference_steps=config.sampling_steps, guidance_scale=config.guidance_scale,
                              generator=generators, output_type="np").images
                for i, image in enumerate(images):
                    pixels = (image * 255).round().astype(np.uint8)
                    per_prompt[start + i] += evaluator.prompt_accuracy(pixels, batch[i]) / config.image_seeds
    mean, stderr = mean_and_stderr(per_prompt.tolist())
    return {"accuracy": mean, "stderr": stderr}


def finetune_ceiling(config: CeilingConfig, progress: Callable[[str], None] = print) -> list[dict]:
    """Fine-tune the whole model on ground-truth renders of ``config.kind``; one row per scoring:
    ``{"step", "accuracy", "stderr", "loss"}`` (step 0 is the model as loaded)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    pipe = DiffusionPipeline.from_pretrained(resolve_model(config.model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    scenes = sample_scenes(config.kind, config.scenes, seed=config.seed + 1000, split="train")
    captions = [caption_of(scene) for scene in scenes]
    latents = encode_scenes(vae, scenes) * vae.config.scaling_factor
    held_out = [caption_of(scene) for scene in sample_scenes(config.kind, config.prompts, seed=7, split="test")]
    trained = list(unet.parameters()) + (list(text_encoder.parameters()) if config.text_encoder else [])
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    def scored(step: int, loss: float | None) -> dict:
        unet.eval()
        row = {"step": step, **score_prompts(pipe, held_out, config), "loss": loss}
        progress(f"[ceiling] {config.kind} step {step}: {100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f}%"
                 + (f" (loss {loss:.4f})" if loss is not None else ""))
        return row

    rows, started, running = [scored(0, None)], time.perf_counter(), []
    for step in range(1, config.steps + 1):
        unet.train()
        index = rng.integers(len(scenes), size=config.batch_size)
        batch_captions = ["" if rng.random() < config.caption_dropout else captions[i] for i in index]
        clean = latents[torch.from_numpy(index)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,),
                                  generator=generator)
        with torch.set_grad_enabled(config.text_encoder):
            hidden = encode_captions(tokenizer, text_encoder, batch_captions)
        prediction = unet(noise_scheduler.add_noise(clean, noise, timesteps), timesteps, hidden).sample
        loss = noise_prediction_loss(prediction, noise, noise_scheduler, timesteps, config.snr_gamma)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % config.score_every == 0 or step == config.steps:
            rows.append(scored(step, float(np.mean(running))))
            running = []
    progress(f"[ceiling] {config.steps} steps in {(time.perf_counter() - started) / 60:.1f} min")
    return rows
