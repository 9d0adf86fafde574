"""The training recipe's optional parts (Ray-free): the optimizer, the learning-rate schedule, the
noise offset and the Min-SNR-γ loss weighting.

Each option's default is the paper's recipe (AdamW, constant learning rate without warm-up, plain
noise-prediction MSE, no noise offset); :mod:`selma.train.step` calls these helpers.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from selma.core.errors import ConfigError

# torch, diffusers and bitsandbytes are imported where used: selma.train.experts imports this module
# through selma.train.step, and the pipeline imports every stage module (the vLLM venv has no diffusers).

if TYPE_CHECKING:
    from selma.core.config import TrainConfig

BITSANDBYTES_HINT = ("install bitsandbytes (pip install 'selma[bnb]' or pip install 'bitsandbytes>=0.45') "
                     "on every training node, or set train.optimizer=adamw")


def check_optimizer_available(train: TrainConfig) -> None:
    """Preflight: an 8-bit optimizer needs bitsandbytes importable here."""
    if train.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer: adamw_8bit needs bitsandbytes, which is not installed; {BITSANDBYTES_HINT}")


def build_optimizer(parameters: list, train: TrainConfig):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over ``parameters`` with ``train``'s settings."""
    import torch

    settings = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
                    weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **settings)
    check_optimizer_available(train)
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(parameters, **settings)


def build_lr_scheduler(optimizer, train: TrainConfig):
    """diffusers' ``get_scheduler`` for ``train.lr_scheduler``, counted in optimizer steps (one
    ``step()`` per optimizer step, whatever the gradient accumulation)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps,
                         num_training_steps=train.max_steps)


def sample_noise(latents, generator, noise_offset: float):
    """Gaussian noise shaped like ``latents``; with ``noise_offset``, plus ``noise_offset`` times one
    normal draw per (sample, channel), constant over the image (diffusers' convention).

    At offset 0 nothing more is drawn from ``generator``, so the random stream is the plain one."""
    import torch

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device,
                             dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def min_snr_weights(scheduler, timesteps, snr_gamma: float):
    """Min-SNR-γ per-sample loss weights (Hang et al. 2023), as diffusers' train_text_to_image_lora.py:
    min(SNR, γ)/SNR for epsilon prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def noise_prediction_loss(model_output, target, scheduler, timesteps, snr_gamma: float | None):
    """The plain MSE, or with ``snr_gamma`` the mean of per-sample MSEs weighted by :func:`min_snr_weights`."""
    import torch.nn.functional as F

    if snr_gamma is None:
        return F.mse_loss(model_output.float(), target.float())
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
