"""The train-step core without Ray: LoRA placement, losses for both prediction types, SDXL conditioning."""

import io

import numpy as np
import pytest
import torch

from selma.train.data import PrepareTrainingBatch
from selma.train.step import LoraSettings, diffusion_loss, load_training_components, lora_state_dict

LORA = LoraSettings(rank=4, alpha=4)


def _png(color, pattern: int) -> bytes:
    from PIL import Image

    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[...] = color
    pixels[pattern * 8 : pattern * 8 + 24, 16:48] = 255 - np.asarray(color, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _batch(model: str, count: int = 4) -> dict:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)][:count]
    rows = {"image": np.array([_png(c, i) for i, c in enumerate(colors)], dtype=object),
            "prompt": np.array([f"a {name} square on a plain background" for name in ("red", "green", "blue", "yellow")[:count]],
                               dtype=object)}
    prepared = PrepareTrainingBatch(model, 64, random_crop=False, random_flip=False)(rows)
    return {key: torch.from_numpy(value) for key, value in prepared.items()}


def test_lora_goes_on_the_attention_projections_only_and_starts_as_a_no_op():
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", LoraSettings(rank=4, alpha=4, init_lora_weights="default"))
    trainable = [name for name, p in components.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} >= {"to_q", "to_k", "to_v"}
    assert any(".to_out.0.lora_" in name for name in trainable)
    assert not any(p.requires_grad for p in components.vae.parameters())
    assert not any(p.requires_grad for e in components.text_encoders for p in e.parameters())
    assert all(float(v.abs().sum()) == 0 for k, v in lora_state_dict(components.unet).items() if "lora_B" in k)


def test_a_target_module_the_unet_lacks_is_a_named_error():
    with pytest.raises(ValueError, match=r"train.target_modules \['to_nothing'\] do not exist"):
        load_training_components("tiny:sd", LoraSettings(rank=4, alpha=4, target_modules=("to_q", "to_nothing")))


def test_v_prediction_uses_the_velocity_target():
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", LORA)
    batch = _batch("tiny:sd", 2)
    epsilon = diffusion_loss(components, batch, torch.Generator().manual_seed(3)).item()
    components.noise_scheduler.register_to_config(prediction_type="v_prediction")
    velocity = diffusion_loss(components, batch, torch.Generator().manual_seed(3)).item()
    assert np.isfinite(velocity) and velocity != pytest.approx(epsilon)
    components.noise_scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        diffusion_loss(components, batch)


def test_sdxl_conditioning_two_encoders_pooled_embeds_and_time_ids():
    torch.manual_seed(0)
    components = load_training_components("tiny:sdxl", LORA)
    assert components.is_sdxl and len(components.text_encoders) == 2
    batch = _batch("tiny:sdxl", 2)
    assert batch["add_time_ids"].shape == (2, 6)
    assert batch["add_time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    loss = diffusion_loss(components, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert np.isfinite(loss.item())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in components.lora_parameters())
