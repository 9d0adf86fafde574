"""GPU benchmark, no Ray: a plain peft LoRA loop vs. selma's train step under DeepSpeed ZeRO-2.

An SD-1.5-architecture UNet with random weights (built from its config, no download) trains a
rank-128 LoRA on its attention projections, bf16, batch 16, on 512 px latents (64×64) and CLIP-L
sized text states. Both variants get the same pre-encoded batches, so the frozen VAE and text
encoder are not part of the comparison (as with cached latents). Prints JSON with samples/s and
peak GPU memory per variant and the ratio ours / plain.

    python jobs/bench_train_gpu.py              # on a GPU machine (a few minutes on an H100)
    python jobs/bench_train_gpu.py --smoke      # CPU, tiny shapes: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time


def plain_peft_step(path: str, rank: int, device: str, dtype):
    """The loop of diffusers' LoRA training example, reduced to its step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.to(device, dtype=dtype)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    for p in parameters:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(parameters, lr=3e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    generator = torch.Generator(device).manual_seed(0)

    def step(batch):
        latents, hidden = batch["latents"], batch["encoder_hidden_states"]
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device,
                                  generator=generator)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def selma_step(path: str, rank: int, device: str, mixed_precision: str, strategy: str):
    from selma.core.config import TrainConfig
    from selma.train.step import LoraTrainStep, init_single_process_group, load_training_components

    train = TrainConfig(rank=rank, alpha=rank, batch_size=16, effective_batch_size=16, strategy=strategy, zero_stage=2,
                        mixed_precision=mixed_precision)
    init_single_process_group(device)
    components = load_training_components(path, train, device=device)
    trainer = LoraTrainStep(components, train, seed=0)
    return lambda batch: trainer.train_micro_batch(batch)


def measure(step, batch: dict, steps: int, device: str) -> dict:
    import torch

    for _ in range(3):  # warm-up
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    samples = batch["latents"].shape[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"samples_per_s": round(samples * steps / seconds, 3), "peak_gib": round(peak, 2) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    args = parser.parse_args()

    import torch

    from bench_images_gpu import build_sd15_architecture

    device = "cpu" if args.smoke else "cuda"
    mixed_precision = "no" if args.smoke else "bf16"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rank, batch_size, steps = (4, 2, 2) if args.smoke else (128, 16, args.steps)
    latent, hidden = (8, 32) if args.smoke else (64, 768)
    generator = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(batch_size, 4, latent, latent, generator=generator).to(device, dtype),
             "encoder_hidden_states": torch.randn(batch_size, 77, hidden, generator=generator).to(device, dtype)}
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": batch_size,
               "rank": rank, "latent_size": latent, "precision": mixed_precision, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_sd15_architecture(tmp, args.smoke)
        variants = {
            "plain_peft": lambda: plain_peft_step(path, rank, device, dtype),
            "selma_deepspeed_zero2": lambda: selma_step(path, rank, device, mixed_precision, "deepspeed"),
        }
        for name, build in variants.items():
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            results[name] = measure(build(), batch, steps, device)
    results["ratio_selma_vs_plain"] = round(
        results["selma_deepspeed_zero2"]["samples_per_s"] / results["plain_peft"]["samples_per_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
