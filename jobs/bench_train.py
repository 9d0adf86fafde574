"""CPU benchmark of the train stage, one run, same tiny UNet, batch and thread count throughout.

* samples/s of the plain single-process loop (selma's train step, PNGs decoded in the loop, no Ray),
  of Ray Train with 1 worker under DDP and under DeepSpeed (ZeRO-2), data through Ray Data;
* samples/s with ``train.cache_latents`` against without, in the plain loop and under Ray Train (DDP),
  and the one-time cost of filling the cache;
* wall time of the train stage for 2 experts side by side vs. one after the other;
* FLOPs per sample of SD-1.5 at 512 px (models built from its published configs on the meta device,
  no weights): VAE encoder and CLIP text encoder forward (what the cache saves) against the UNet's
  forward and backward with a rank-128 LoRA (what remains).

Steady-state samples/s leave out the first ``--warmup`` optimizer steps (model load, first batches).
Prints JSON.

    python jobs/bench_train.py                 # about 8 minutes on 2 cores
    python jobs/bench_train.py --cache-only    # the cache comparison and the FLOP estimate only
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

SKILLS = ["coco", "whoops"]


def steady_samples_per_s(metrics: list[dict], batch: int, warmup: int) -> float:
    steady = [m for m in metrics if m["step"] > warmup]
    seconds = sum(batch / m["samples_per_s"] for m in steady)
    return round(len(steady) * batch / seconds, 3)


def plain_loops(run_dir: Path, skill: str, config, warmup: int, rounds: int = 3) -> dict:
    """samples/s of the plain loop (no Ray) without and with the cache, timed in alternating rounds
    on one trainer (the median of each), and the seconds it took to encode the images once."""
    import statistics

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from selma.core.rundir import RunDir
    from selma.train.cache import CacheSpec, EncodeForCache, decode_cached
    from selma.train.data import PrepareTrainingBatch
    from selma.train.step import LoraTrainStep, load_training_components

    t = config.train
    torch.set_num_threads(int(t.resources.cpus))
    rows = pq.ParquetDataset(sorted((run_dir / "images" / skill).glob("*.parquet"))).read().to_pydict()
    images = {"image_id": rows["image_id"], "skill": rows["skill"], "image": rows["image"], "prompt": rows["prompt"]}
    started = time.perf_counter()
    encode = EncodeForCache(CacheSpec.for_run(config, RunDir(str(run_dir)), 64), "cpu", int(t.resources.cpus))
    cache = pa.table(encode({k: np.array(v, dtype=object) for k, v in images.items()}))
    fill_s = round(time.perf_counter() - started, 3)
    prepare = PrepareTrainingBatch(config.model, 64)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    trainer = LoraTrainStep(load_training_components(config.model, t), t, seed=0)

    def rate(cached: bool) -> float:
        started = None
        for step in range(t.max_steps):
            if step == warmup:
                started = time.perf_counter()
            start = (step * t.batch_size) % (len(images["image"]) - t.batch_size + 1)
            if cached:
                batch = decode_cached(cache.slice(start, t.batch_size), rng.random(t.batch_size) < 0.5)
            else:
                batch, _ = prepare({k: v[start:start + t.batch_size] for k, v in images.items()})
            trainer.train_micro_batch({k: torch.from_numpy(v) for k, v in batch.items()})
        return (t.max_steps - warmup) * t.batch_size / (time.perf_counter() - started)

    uncached, cached = [], []
    for _ in range(rounds):
        uncached.append(rate(False))
        cached.append(rate(True))
    plain, with_cache = statistics.median(uncached), statistics.median(cached)
    return {"plain_loop_samples_per_s": round(plain, 3), "plain_loop_cached_samples_per_s": round(with_cache, 3),
            "plain_loop_cached_vs_uncached": round(with_cache / plain, 3), "plain_loop_rounds": rounds,
            "plain_loop_cache_fill_s": fill_s}


def sd15_flops_per_sample(resolution: int = 512, rank: int = 128) -> dict:
    """FLOPs (2 per multiply-add, as torch's FlopCounterMode counts) of one training sample of SD-1.5,
    on models built from its published configs on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=resolution)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768))
        unet_params = sum(p.numel() for p in unet.parameters())
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        pixels, token_ids = torch.randn(1, 3, resolution, resolution), torch.zeros(1, 77, dtype=torch.long)
        latents, hidden, timestep = torch.randn(1, 4, resolution // 8, resolution // 8), torch.randn(1, 77, 768), torch.tensor([500])

    def flops(run) -> int:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    def unet_step() -> None:
        unet(latents, timestep, hidden).sample.float().pow(2).mean().backward()

    vae_encoder, text_encoder = flops(lambda: vae.encode(pixels)), flops(lambda: clip(token_ids))
    unet_forward_backward = flops(unet_step)
    saved = vae_encoder + text_encoder
    return {"resolution": resolution, "lora_rank": rank,
            "params_m": {"unet": round(unet_params / 1e6, 1),
                         "vae_encoder": round(sum(p.numel() for p in vae.encoder.parameters()) / 1e6, 1),
                         "text_encoder": round(sum(p.numel() for p in clip.parameters()) / 1e6, 1)},
            "gflops_per_sample": {"vae_encoder_forward": round(vae_encoder / 1e9, 1),
                                  "text_encoder_forward": round(text_encoder / 1e9, 1),
                                  "unet_forward": round(flops(lambda: unet(latents, timestep, hidden)) / 1e9, 1),
                                  "unet_forward_backward_lora": round(unet_forward_backward / 1e9, 1)},
            "saved_fraction": round(saved / (saved + unet_forward_backward), 3),
            "speedup_bound": round((saved + unet_forward_backward) / unet_forward_backward, 3),
            "cache_fill_gflops_per_image": round((2 * vae_encoder + text_encoder) / 1e9, 1)}


def train(run_dir: Path, base: list[str], overrides: list[str]) -> tuple[float, dict]:
    from selma.config import load_config
    from selma.pipeline import run_stages

    config = load_config("tiny", [*base, f"run_dir={run_dir}", *overrides])
    started = time.perf_counter()
    run_stages(config, ("train",), progress=lambda message: None)
    wall = round(time.perf_counter() - started, 2)
    metrics = {s: [json.loads(line) for line in (run_dir / "experts" / s / "metrics.jsonl").read_text().splitlines()]
               for s in SKILLS}
    return wall, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cache-only", action="store_true",
                        help="only the runs with and without train.cache_latents, and the FLOP estimate")
    args = parser.parse_args()

    import ray

    from selma.config import load_config
    from selma.pipeline import run_stages

    base = [f"skills.names={SKILLS}", "prompts.per_skill=16", "images.steps=2",
            # logical CPUs: each expert holds 1 for its worker (1 torch thread) and 1 for its data pipeline
            "ray.num_cpus=4",
            f"train.batch_size={args.batch}", f"train.effective_batch_size={args.batch}",
            f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.resources.cpus=1",
            "train.resources.workers=1"]
    results: dict = {"machine": "cpu", "model": "tiny:sd", "batch": args.batch, "steps": args.steps,
                     "warmup_steps": args.warmup, "threads_per_trainer": 1}
    with tempfile.TemporaryDirectory(prefix="selma-bench-train-") as tmp:
        images = Path(tmp) / "images"
        run_stages(load_config("tiny", [*base, f"run_dir={images}"]), ("prompts", "images"),
                   progress=lambda message: None)

        def fresh(name: str) -> Path:
            shutil.copytree(images, Path(tmp) / name)
            return Path(tmp) / name

        config = load_config("tiny", [*base, f"run_dir={images}"])
        results.update(plain_loops(images, SKILLS[0], config, args.warmup))

        sequential = ["train.strategy=ddp", "train.max_concurrent_experts=1"]
        sequential_wall, ddp = train(fresh("ddp-sequential"), base, sequential)
        cached_run = fresh("ddp-cached")
        cached_wall, ddp_cached = train(cached_run, base, [*sequential, "train.cache_latents=true"])
        fill = json.loads((cached_run / "run.json").read_text())["stages"]["train"]["latent_cache"]
        if not args.cache_only:
            concurrent_wall, _ = train(fresh("ddp-concurrent"), base, ["train.strategy=ddp"])
            _, deepspeed = train(fresh("deepspeed"), base, ["train.strategy=deepspeed", "train.zero_stage=2",
                                                             "train.max_concurrent_experts=1"])
    ray.shutdown()
    plain = results["plain_loop_samples_per_s"]
    runs = [("ray_train_1_worker_ddp", ddp), ("ray_train_1_worker_ddp_cached", ddp_cached)]
    if not args.cache_only:
        runs.append(("ray_train_1_worker_deepspeed", deepspeed))
    for name, metrics in runs:
        rate = steady_samples_per_s(metrics[SKILLS[0]], args.batch, args.warmup)
        results[f"{name}_samples_per_s"] = rate
        results[f"{name}_vs_plain"] = round(rate / plain, 3)
    results["ray_train_ddp_cached_vs_uncached"] = round(
        results["ray_train_1_worker_ddp_cached_samples_per_s"] / results["ray_train_1_worker_ddp_samples_per_s"], 3)
    results["ray_cache_fill"] = {"images": fill["encoded"], "seconds": fill["seconds"]}
    results["two_experts_sequential_wall_s"] = sequential_wall
    results["two_experts_sequential_cached_wall_s"] = cached_wall
    if not args.cache_only:
        results["two_experts_concurrent_wall_s"] = concurrent_wall
        results["concurrent_vs_sequential_wall"] = round(concurrent_wall / sequential_wall, 3)
    results["sd15_flops"] = sd15_flops_per_sample()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
