"""The top-level ``vae`` override: an ``AutoencoderKL`` loaded in place of a pipeline's own VAE.

A VAE is specific to a model family's latent space (its channels and downsampling), so the
preflight checks the override against the model it replaces the VAE of, from configs only.
"""

from __future__ import annotations

from pathlib import Path

from selma.core.errors import ConfigError
from selma.core.models import resolve_model

# diffusers is imported where used: selma.merge.fuse and the stages import this module, and the
# vLLM venv that runs the prompt stage has no diffusers.

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def load_vae(spec: str, dtype):
    """The ``AutoencoderKL`` at ``spec`` (folder or hub id), in ``dtype``; safetensors weights only."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(resolve_model(spec), torch_dtype=dtype, use_safetensors=True)


def check_vae(spec: str | None, model: str) -> None:
    """Preflight of ``vae`` against ``model``: the override's config loads, a local folder holds
    safetensors weights, and its latents have the shape the model's UNet takes. Raises ConfigError."""
    from diffusers import AutoencoderKL

    if spec is None:
        return
    path = resolve_model(spec)
    try:
        config = AutoencoderKL.load_config(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"vae: cannot load an AutoencoderKL config from {spec!r}: {err}") from None
    if config.get("_class_name") not in (None, "AutoencoderKL"):
        raise ConfigError(f"vae: {spec!r} is a {config['_class_name']}, not an AutoencoderKL")
    if Path(path).is_dir() and not (Path(path) / WEIGHTS_FILE).exists():
        raise ConfigError(f"vae: {spec!r} holds no safetensors weights ({WEIGHTS_FILE})")
    try:
        own = AutoencoderKL.load_config(resolve_model(model), subfolder="vae")
    except (OSError, ValueError):
        return  # the model's own loading reports a model that is not there
    for key, meaning in (("latent_channels", "latent channels"), ("block_out_channels", "downsampling blocks")):
        ours, theirs = config.get(key), own.get(key)
        if key == "block_out_channels":
            ours, theirs = len(ours or ()), len(theirs or ())
        if ours != theirs:
            raise ConfigError(f"vae: {spec!r} has {ours} {meaning}, the VAE of {model} has {theirs}; "
                              "a VAE must match the model's latent space")
