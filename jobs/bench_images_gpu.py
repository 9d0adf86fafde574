"""GPU benchmark, no Ray: plain diffusers defaults vs. selma's optimised generator.

An SD-1.5-architecture pipeline with random weights is built from its config (no download), then
both variants draw the same prompts at 512 px, bf16, 30 steps, batch 8 and 16. Prints JSON with
images/s and peak GPU memory per variant and batch, and the ratio ours / plain.

    python jobs/bench_images_gpu.py                 # on a GPU machine (about 5 minutes on an H100)
    python jobs/bench_images_gpu.py --smoke         # CPU, tiny sizes: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def build_sd15_architecture(out_dir: str, smoke: bool) -> str:
    """SD-1.5's UNet / VAE / CLIP-L shapes with random weights, saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from selma.models.tiny import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8 if smoke else 64,
        block_out_channels=(32, 64, 64, 64) if smoke else (320, 640, 1280, 1280),
        layers_per_block=1 if smoke else 2,
        cross_attention_dim=32 if smoke else 768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32) if smoke else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1 if smoke else 2,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer) if smoke else 49408, hidden_size=32 if smoke else 768,
        intermediate_size=64 if smoke else 3072, num_hidden_layers=2 if smoke else 12,
        num_attention_heads=4 if smoke else 12, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def measure(draw, batch: int, repeats: int, device: str) -> dict:
    import torch

    prompts = [f"three red apples next to a blue chair, photo {i}" for i in range(batch)]
    draw(prompts)  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        draw(prompts)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"batch": batch, "images_per_s": round(batch * repeats / seconds, 3),
            "peak_gib": round(peak, 2) if peak is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    args = parser.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator

    device = "cpu" if args.smoke else "cuda"
    dtype = "float32" if args.smoke else "bfloat16"
    steps = 2 if args.smoke else args.steps
    batches = [2] if args.smoke else [int(b) for b in args.batches.split(",")]
    size = 64 if args.smoke else 512
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": steps,
               "resolution": size, "dtype": dtype, "plain": [], "selma": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_sd15_architecture(tmp, args.smoke)

        plain = StableDiffusionPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype)).to(device)
        plain.set_progress_bar_config(disable=True)
        for batch in batches:
            results["plain"].append(measure(
                lambda p: plain(p, num_inference_steps=steps, height=size, width=size, output_type="np"),
                batch, args.repeats, device))
        del plain
        if device == "cuda":
            torch.cuda.empty_cache()

        settings = ImagesConfig(steps=steps, guidance_scale=7.5, resolution=size, dtype=dtype,
                                channels_last=True, compile=not args.smoke)
        ours = ImageGenerator(path, settings, device=device)
        for batch in batches:
            results["selma"].append(measure(lambda p: ours.generate(p, list(range(len(p)))), batch,
                                            args.repeats, device))
    results["ratio_selma_vs_plain"] = [
        round(o["images_per_s"] / p["images_per_s"], 3) for o, p in zip(results["selma"], results["plain"])]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
