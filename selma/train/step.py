"""LoRA fine-tuning of a diffusion UNet (Ray-free core): model loading, LoRA, one loss.

LoRA goes on the UNet attention projections (``to_q, to_k, to_v, to_out.0``); VAE and text
encoder(s) are frozen. The loss is the plain noise-prediction MSE against the scheduler's
``prediction_type`` target (``epsilon`` or ``v_prediction``). SDXL-family UNets also receive
pooled text embeddings and ``add_time_ids`` (original size, crop corner, target size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    init_lora_weights: str = "gaussian"
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @classmethod
    def from_config(cls, train_config) -> "LoraSettings":
        return cls(train_config.rank, train_config.alpha, train_config.init_lora_weights,
                   tuple(train_config.target_modules))

    def peft_config(self):
        from peft import LoraConfig

        init = True if self.init_lora_weights == "default" else self.init_lora_weights
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights=init,
                          target_modules=list(self.target_modules))


@dataclass
class TrainingComponents:
    unet: Any
    vae: Any
    text_encoders: list
    noise_scheduler: Any
    is_sdxl: bool
    device: str
    weight_dtype: Any

    def lora_parameters(self) -> list:
        return [p for p in self.unet.parameters() if p.requires_grad]


def weight_dtype_for(mixed_precision: str):
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_training_components(model: str, lora: LoraSettings, *, mixed_precision: str = "no",
                             device: str = "cpu") -> TrainingComponents:
    """Frozen VAE/text encoders and a UNet carrying a fresh fp32 LoRA adapter."""
    import torch
    from diffusers import DDPMScheduler

    from selma.images.generator import load_pipeline

    dtype = weight_dtype_for(mixed_precision)
    pipe = load_pipeline(model, dtype="float32", device="cpu")
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    for module in [unet, vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
    missing = [m for m in lora.target_modules if not any(name.endswith(m) for name, _ in unet.named_modules())]
    if missing:
        raise ValueError(f"train.target_modules {missing} do not exist in the UNet of {model}")
    unet.add_adapter(lora.peft_config())
    for module in [unet, vae, *text_encoders]:
        module.to(device, dtype=dtype)
    for parameter in unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)
    unet.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingComponents(unet, vae, text_encoders, scheduler, hasattr(pipe, "text_encoder_2"), device, dtype)


def encode_text(components: TrainingComponents, batch: dict) -> tuple[Any, dict]:
    """encoder_hidden_states and, for SDXL, added_cond_kwargs."""
    import torch

    encoders = components.text_encoders
    with torch.no_grad():
        if not components.is_sdxl:
            return encoders[0](batch["input_ids"])[0], {}
        hidden, pooled = [], None
        for encoder, key in zip(encoders, ("input_ids", "input_ids_2")):
            output = encoder(batch[key], output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the projection model's pooled text_embeds
        time_ids = batch["add_time_ids"].to(components.weight_dtype)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


def diffusion_loss(components: TrainingComponents, batch: dict, generator=None):
    """Noise-prediction MSE for one batch of ``pixel_values`` in [-1, 1] plus token ids."""
    import torch
    import torch.nn.functional as F

    unet, vae, scheduler = components.unet, components.vae, components.noise_scheduler
    pixels = batch["pixel_values"].to(components.device, components.weight_dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    hidden, added = encode_text(components, batch)
    model_output = unet(noisy, timesteps, hidden, added_cond_kwargs=added or None).sample
    return F.mse_loss(model_output.float(), target.float())


def lora_state_dict(unet) -> dict:
    """The trainable LoRA tensors of a UNet (unwrapped), keyed as peft names them."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint has LoRA tensors this UNet lacks: {unexpected[:5]}")
