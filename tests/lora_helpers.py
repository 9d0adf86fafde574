"""A random diffusers-format LoRA for tests (serving, merging, run directories)."""


def write_random_lora(base_model: str, out_dir, seed: int = 0) -> str:
    """A diffusers-format UNet LoRA with non-zero B, so it changes every attention projection."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from selma.images.generator import load_pipeline

    pipe = load_pipeline(base_model, device="cpu")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return str(out_dir)
