"""Train the shapes world's text-to-image base model from scratch (``selma world train-base``).

The result is an ordinary Stable Diffusion pipeline folder (``save_pretrained``, safetensors)
that every stage loads with ``DiffusionPipeline.from_pretrained``:

- a CLIP tokenizer whose BPE was trained on the world's words, so each word is one token;
- a small ``AutoencoderKL`` (by default 4× down: 64×64 RGB ↔ 16×16×8 latents), trained first;
- a ``CLIPTextModel`` trained jointly with the denoiser (nothing pretrained exists to freeze);
- a ``UNet2DConditionModel`` with attention (self and cross) at 8×8 and in the 4×4 middle block,
  the attention-pooled caption added to its timestep embedding (so every ResNet block, 16×16
  included, sees the caption), epsilon prediction on a linear β schedule (DDIM "leading"
  spacing at inference), min-SNR-weighted loss, and an EMA of the weights that is what gets saved.

Neither network attends over 16×16 positions: on a CPU that attention cost more than the rest
of the UNet put together (it made a training step 2.2× slower).

Training scenes are drawn from every caption kind. Like web alt-text, the captions are loose: a
share (``partial_caption_rate``) names only one of the scene's objects, a group of several is
given its number only at ``count_rate`` ("red circles" otherwise) and a relation is stated only at
``relation_rate`` (otherwise the two objects are listed). The base model learns the vocabulary but
not to be exact: the gap SELMA's skill data is meant to close.

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
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import CLIPTextConfig, CLIPTextModel

from selma.images.generator import default_device
from selma.models.tiny import build_clip_tokenizer, write_clip_vocab_files
from selma.world.captions import caption_of, format_caption, sample_scenes
from selma.world.evaluator import WorldEvaluator
from selma.world.render import render
from selma.world.scene import COLORS, NUMBER_WORDS, PLURALS, SHAPES, SIZES, Entity, SceneGraph, sample_scene

WORLD_PROMPT_TOKENS = 32
SHIPPED_MODELS = {"base": Path(__file__).resolve().parent / "base_model",
                  "small": Path(__file__).resolve().parent / "small_model"}
SHIPPED_MODEL_DIR = SHIPPED_MODELS["base"]
EXTRA_WORDS = ["a", "an", *NUMBER_WORDS, *SIZES, *"and to the left right of above below".split()]


class BaseModelConfig(BaseModel):
    """How ``selma world train-base`` trains; every field can be overridden as ``key=value``."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ...; None: cuda when there is one")
    kinds: list[str] = Field(default_factory=lambda: ["single", "counting", "binding", "spatial", "multi"], min_length=1)
    partial_caption_rate: float = Field(0.25, ge=0, le=1,
                                        description="share of training captions that name one object of the scene")
    count_rate: float = Field(0.5, ge=0, le=1, description="share of groups of several given their number")
    relation_rate: float = Field(0.5, ge=0, le=1, description="share of spatial scenes whose relation is stated")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of empty captions (classifier-free guidance)")
    pool_size: int = Field(32768, ge=64, description="rendered training scenes, encoded to latents once")
    vae_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=2, max_length=3,
                                    description="per VAE level; three levels give 16×16 latents, two 32×32")
    latent_channels: int = Field(8, ge=1)
    vae_steps: int = Field(600, ge=1)
    vae_batch_size: int = Field(16, ge=1)
    vae_learning_rate: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(1e-6, ge=0)
    steps: int = Field(9000, ge=1, description="denoiser (UNet + text encoder) steps")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    min_snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR loss weighting; None: plain MSE")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    unet_channels: list[int] = Field(default_factory=lambda: [64, 96, 128], min_length=2, max_length=4)
    unet_cross_attention: list[bool] = Field(
        default_factory=lambda: [False, True, False], min_length=2, max_length=4,
        description="per UNet level (latent size, half, ...), whether it has attention layers; the middle "
                    "block always has")
    unet_pooled_text: bool = Field(True, description="add the attention-pooled caption to the timestep embedding, "
                                   "so every ResNet block, at every resolution, sees the caption")
    text_hidden_size: int = Field(64, ge=8)
    log_every: int = Field(100, ge=1)
    save_dtype: str = Field("float16", pattern="^(float16|float32)$")

    @model_validator(mode="after")
    def _unet_levels_agree(self):
        if len(self.unet_cross_attention) != len(self.unet_channels):
            raise ValueError(f"unet_cross_attention has {len(self.unet_cross_attention)} levels but unet_channels "
                             f"{len(self.unet_channels)}: give one entry per UNet level in each")
        return self

    @property
    def latent_size(self) -> int:
        return 64 // 2 ** (len(self.vae_channels) - 1)


def shipped_base_model(name: str = "base") -> Path:
    """A model shipped with selma: ``world:base``, or the smaller ``world:small`` (weak-to-strong)."""
    folder = SHIPPED_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the shapes-world model world:{name} is not in {folder}; train one with "
                                "`selma world train-base DIR` and set model: DIR")
    return folder


def resolve_world(spec: str) -> str:
    """``world:base`` / ``world:small``: the shipped model's folder (registered for the ``world:``
    prefix of :func:`selma.core.models.resolve_model`)."""
    name = spec.removeprefix("world:")
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shapes-world model {spec!r}; those shipped are "
                         + ", ".join(f"world:{n}" for n in SHIPPED_MODELS))
    return str(shipped_base_model(name))


def world_words() -> list[str]:
    return list(dict.fromkeys([*EXTRA_WORDS, *COLORS, *SHAPES, *PLURALS.values()]))


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
    # Attention over 16×16 positions costs more than the rest of either network on a CPU.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels), block_out_channels=tuple(config.vae_channels),
        layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=min(16, *config.vae_channels),
        sample_size=64, mid_block_add_attention=False)
    attention = config.unet_cross_attention
    unet = UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(config.unet_channels), layers_per_block=1, attention_head_dim=4,
        norm_num_groups=16, cross_attention_dim=config.text_hidden_size,
        addition_embed_type="text" if config.unet_pooled_text else None, addition_embed_type_num_heads=4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    return tokenizer, text_encoder, vae, unet, scheduler


def training_caption(scene, rng, config: BaseModelConfig) -> str:
    """The caption a training scene is shown with: empty, one of its objects, or all of it in
    loose words (groups without their number, relations unstated; see the module docstring)."""
    draw = rng.random()
    if draw < config.caption_dropout:
        return ""
    if draw < config.caption_dropout + config.partial_caption_rate and len(scene.objects) > 1:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return format_caption(SceneGraph((Entity(1, obj.color, obj.shape),)))
    graph = scene.graph
    if graph.relations and rng.random() >= config.relation_rate:
        graph = SceneGraph(graph.entities)
    numbers = all(e.count == 1 for e in graph.entities) or rng.random() < config.count_rate
    return format_caption(graph, numbers=numbers)


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


def make_posterior_deterministic(vae) -> None:
    """Set the encoder's log-variance to its floor (-30), so a posterior sample is its mean.

    With so small a KL weight the posterior's noise outweighs the spread of its means and the
    decoder learns to ignore it; left in, every ``latent_dist.sample()`` downstream (the LoRA train
    step, any diffusers training script) would bury the picture under noise no denoiser can predict.
    """
    half = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(-30.0)


def reconstruction_accuracy(vae, kinds: list[str], per_kind: int = 40, device: str = "cpu") -> dict[str, float]:
    """The exact evaluator's prompt accuracy on VAE round trips of held-out renders, per kind: the
    most any model drawing through this VAE can reach."""
    evaluator, result = WorldEvaluator(), {}
    with torch.no_grad():
        for kind in kinds:
            scenes = sample_scenes(kind, per_kind, seed=12345)
            decoded = vae.decode(vae.encode(_pixels(scenes).to(device)).latent_dist.mean).sample
            images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            result[kind] = sum(evaluator.prompt_accuracy(image, caption_of(scene))
                               for image, scene in zip(images, scenes)) / per_kind
    return result


def encode_pool(vae, config: BaseModelConfig, progress: Callable[[str], None], device: str = "cpu"):
    """Render ``pool_size`` scenes and encode them once: (scenes, latent means)."""
    rng = np.random.default_rng([config.seed, 2])
    kinds = [config.kinds[int(i)] for i in rng.integers(len(config.kinds), size=config.pool_size)]
    scenes = [sample_scene(kind, int(rng.integers(2**62))) for kind in kinds]
    means = encode_scenes(vae, scenes, device)
    progress(f"[world] encoded {len(scenes)} training scenes")
    return scenes, means


def encode_scenes(vae, scenes, device: str = "cpu") -> torch.Tensor:
    """The VAE's latent means of the scenes' renders, rendered and encoded 256 at a time."""
    with torch.no_grad():
        return torch.cat([vae.encode(_pixels(scenes[start:start + 256]).to(device)).latent_dist.mean
                          for start in range(0, len(scenes), 256)])


def encode_captions(tokenizer, text_encoder, captions: list[str]):
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def train_denoiser(tokenizer, text_encoder, unet, scheduler, pool, scaling_factor: float, config: BaseModelConfig,
                   progress: Callable[[str], None], log: list[dict], device: str = "cpu"):
    """Train UNet and text encoder on the latent pool; returns their EMA copies."""
    scenes, means = pool
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
        latents = means[index] * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,),
                                  generator=generator)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encode_captions(tokenizer, text_encoder, captions)).sample
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
    make_posterior_deterministic(vae)
    vae_seconds = time.perf_counter() - started
    reconstruction = reconstruction_accuracy(vae, config.kinds, device=device)
    progress(f"[world] exact on VAE round trips: {reconstruction}")
    scenes, means = encode_pool(vae, config, progress, device)
    pool = (scenes, means.cpu())
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
              "vae_reconstruction_accuracy": reconstruction,
              "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "log": log}
    (out / "world_base.json").write_text(json.dumps(record, indent=2) + "\n")
    progress(f"[world] saved the base model to {out} ({total / 60:.1f} min)")
    return out
