"""Train the shapes world's text-to-image base model from scratch (``selma world train-base``).

The result is an ordinary Stable Diffusion pipeline folder (``save_pretrained``, safetensors)
that every stage loads with ``DiffusionPipeline.from_pretrained``:

- a CLIP tokenizer whose BPE was trained on the world's words, so each word is one token;
- a small ``AutoencoderKL`` (4× down: 64×64 RGB ↔ 16×16×4 latents), trained first;
- a ``CLIPTextModel`` trained jointly with the denoiser (nothing pretrained exists to freeze);
- a ``UNet2DConditionModel`` with cross-attention at 16×16 and 8×8, epsilon prediction on a
  linear β schedule (DDIM "leading" spacing at inference), min-SNR-weighted loss, and an EMA
  of the weights that is what gets saved.

Training scenes are drawn from every caption kind. Like web alt-text, a share of the captions
(``partial_caption_rate``) names only one of the scene's objects, so the base model learns the
vocabulary but not to be exact: the gap SELMA's skill data is meant to close.

Deterministic for a given config and thread count.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import CLIPTextConfig, CLIPTextModel

from selma.images.generator import default_device
from selma.models.tiny import build_clip_tokenizer, write_clip_vocab_files
from selma.world.captions import caption_of
from selma.world.render import render
from selma.world.scene import COLORS, SHAPES, sample_scene

WORLD_PROMPT_TOKENS = 32
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "base_model"
EXTRA_WORDS = "a one two three four and to the left right of above below".split()


class BaseModelConfig(BaseModel):
    """How ``selma world train-base`` trains; every field can be overridden as ``key=value``."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ...; None: cuda when there is one")
    kinds: list[str] = Field(default_factory=lambda: ["single", "counting", "binding", "spatial", "multi"], min_length=1)
    partial_caption_rate: float = Field(0.25, ge=0, le=1,
                                        description="share of training captions that name one object of the scene")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of empty captions (classifier-free guidance)")
    pool_size: int = Field(32768, ge=64, description="rendered training scenes, encoded to latents once")
    vae_steps: int = Field(900, ge=1)
    vae_batch_size: int = Field(16, ge=1)
    vae_learning_rate: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(1e-6, ge=0)
    steps: int = Field(4500, ge=1, description="denoiser (UNet + text encoder) steps")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    min_snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR loss weighting; None: plain MSE")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    unet_channels: list[int] = Field(default_factory=lambda: [64, 96, 128], min_length=3, max_length=3)
    text_hidden_size: int = Field(64, ge=8)
    log_every: int = Field(100, ge=1)
    save_dtype: str = Field("float16", pattern="^(float16|float32)$")


def shipped_base_model() -> Path:
    """The base model shipped with selma (``world:base``)."""
    if not (SHIPPED_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the shapes-world base model is not in {SHIPPED_MODEL_DIR}; train one with "
                                "`selma world train-base DIR` and set model: DIR")
    return SHIPPED_MODEL_DIR


def resolve_world(spec: str) -> str:
    """``world:base``: the shipped model's folder (registered for the ``world:`` prefix of
    :func:`selma.core.models.resolve_model`)."""
    if spec != "world:base":
        raise ValueError(f"unknown shapes-world model {spec!r}; the one shipped is world:base")
    return str(shipped_base_model())


def world_words() -> list[str]:
    return list(dict.fromkeys([*EXTRA_WORDS, *COLORS, *SHAPES, *(f"{shape}s" for shape in SHAPES)]))


def build_world_tokenizer():
    """A ``CLIPTokenizer`` in which every world word is a single token."""
    return build_clip_tokenizer(world_words(), model_max_length=WORLD_PROMPT_TOKENS)


def build_components(config: BaseModelConfig):
    """Randomly initialised tokenizer, text encoder, VAE, UNet and scheduler (seeded)."""
    tokenizer = build_world_tokenizer()
    torch.manual_seed(config.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size, intermediate_size=2 * config.text_hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=WORLD_PROMPT_TOKENS,
        projection_dim=config.text_hidden_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=64)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(config.unet_channels), layers_per_block=1, attention_head_dim=4,
        norm_num_groups=16, cross_attention_dim=config.text_hidden_size)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    return tokenizer, text_encoder, vae, unet, scheduler


def training_caption(scene, rng, config: BaseModelConfig) -> str:
    """The caption a training scene is shown with: empty, one of its objects, or all of it."""
    draw = rng.random()
    if draw < config.caption_dropout:
        return ""
    if draw < config.caption_dropout + config.partial_caption_rate and len(scene.objects) > 1:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return f"a {obj.color} {obj.shape}"
    return caption_of(scene)


def _pixels(scenes) -> torch.Tensor:
    batch = np.stack([render(scene) for scene in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, config: BaseModelConfig, progress: Callable[[str], None], log: list[dict], device: str = "cpu") -> None:
    rng = np.random.default_rng([config.seed, 1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.vae_learning_rate, total_steps=config.vae_steps,
                                                   pct_start=0.05)
    vae.train()
    started = time.perf_counter()
    for step in range(1, config.vae_steps + 1):
        kinds = [config.kinds[int(i)] for i in rng.integers(len(config.kinds), size=config.vae_batch_size)]
        pixels = _pixels([sample_scene(kind, int(rng.integers(2**62))) for kind in kinds]).to(device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + config.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == config.vae_steps:
            elapsed = time.perf_counter() - started
            log.append({"phase": "vae", "step": step, "loss": loss.item(), "seconds": round(elapsed, 1)})
            progress(f"[world] vae step {step}/{config.vae_steps} loss {loss.item():.5f} ({elapsed:.0f} s)")
    vae.eval()


def encode_pool(vae, config: BaseModelConfig, progress: Callable[[str], None], device: str = "cpu"):
    """Render ``pool_size`` scenes and encode them once: (scenes, latent means, latent stds)."""
    rng = np.random.default_rng([config.seed, 2])
    kinds = [config.kinds[int(i)] for i in rng.integers(len(config.kinds), size=config.pool_size)]
    scenes = [sample_scene(kind, int(rng.integers(2**62))) for kind in kinds]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(scenes), 256):
            posterior = vae.encode(_pixels(scenes[start:start + 256]).to(device)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    progress(f"[world] encoded {len(scenes)} training scenes")
    return scenes, torch.cat(means), torch.cat(stds)


def _encode_text(tokenizer, text_encoder, captions: list[str]):
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def train_denoiser(tokenizer, text_encoder, unet, scheduler, pool, scaling_factor: float, config: BaseModelConfig,
                   progress: Callable[[str], None], log: list[dict], device: str = "cpu"):
    """Train UNet and text encoder on the latent pool; returns their EMA copies."""
    scenes, means, stds = pool
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = AveragedModel(modules, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.learning_rate, weight_decay=0.01)

    def learning_rate(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    rng = np.random.default_rng([config.seed, 3])
    generator = torch.Generator().manual_seed(config.seed)
    modules.train()
    started = time.perf_counter()
    running = 0.0
    for step in range(1, config.steps + 1):
        index = torch.from_numpy(rng.integers(len(scenes), size=config.batch_size))
        captions = [training_caption(scenes[int(i)], rng, config) for i in index]
        # Random numbers come from one CPU generator, so a run is the same on any device.
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,),
                                  generator=generator)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, _encode_text(tokenizer, text_encoder, captions)).sample
        errors = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            snr = compute_snr(noise_scheduler, timesteps)
            errors = errors * torch.clamp(snr, max=config.min_snr_gamma) / snr
        loss = errors.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update_parameters(modules)
        running += loss.item()
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - started
            mean_loss = running / (config.log_every if step % config.log_every == 0 else step % config.log_every)
            running = 0.0
            log.append({"phase": "denoiser", "step": step, "loss": mean_loss, "seconds": round(elapsed, 1),
                        "images_per_second": round(step * config.batch_size / elapsed, 1)})
            progress(f"[world] denoiser step {step}/{config.steps} loss {mean_loss:.4f} "
                     f"({step * config.batch_size / elapsed:.0f} img/s, {elapsed / 60:.1f} min)")
    return ema.module["unet"].eval(), ema.module["text_encoder"].eval()



def train_base_model(out_dir: str | Path, config: BaseModelConfig | None = None,
                     progress: Callable[[str], None] = print) -> Path:
    """Train the world's base pipeline and ``save_pretrained`` it to ``out_dir``.

    Besides the pipeline, ``out_dir`` gets ``world_base.json``: the config, the loss curve and
    the time each phase took.
    """
    config = config or BaseModelConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = config.device or default_device()
    started = time.perf_counter()
    tokenizer, text_encoder, vae, unet, scheduler = build_components(config)
    vae, text_encoder, unet = vae.to(device), text_encoder.to(device), unet.to(device)
    log: list[dict] = []
    train_vae(vae, config, progress, log, device)
    vae_seconds = time.perf_counter() - started
    scenes, means, stds = encode_pool(vae, config, progress, device)
    pool = (scenes, means.cpu(), stds.cpu())
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    unet, text_encoder = train_denoiser(tokenizer, text_encoder, unet, scheduler, pool, scaling_factor, config,
                                        progress, log, device)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu", getattr(torch, config.save_dtype))
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_vocab_files(out / "tokenizer")
    total = time.perf_counter() - started
    record = {"config": config.model_dump(), "seconds": {"vae": round(vae_seconds, 1), "total": round(total, 1)},
              "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "log": log}
    (out / "world_base.json").write_text(json.dumps(record, indent=2) + "\n")
    progress(f"[world] saved the base model to {out} ({total / 60:.1f} min)")
    return out
