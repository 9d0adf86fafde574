"""Benchmark: the Ray Data image stage (1 and 2 actors) against the plain batched loop.

Same tiny model, batch size, prompts and steps for all three; prints JSON. Warm throughput
excludes actor start-up and model loading: it counts the images written after each actor's first
batch, over the time from then to the last write. Model load time is reported on its own.

    python jobs/bench_images.py --images 96 --steps 20 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def plain_loop(prompts, seeds, args) -> dict:
    import torch

    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator, png_bytes

    torch.set_num_threads(1)
    started = time.perf_counter()
    generator = ImageGenerator(args.model, ImagesConfig(steps=args.steps, guidance_scale=7.5), device="cpu")
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        for image in generator.generate(prompts[i:i + args.batch_size], seeds[i:i + args.batch_size]):
            png_bytes(image)
    seconds = time.perf_counter() - started
    return {"model_load_s": round(load_seconds, 3), "seconds": round(seconds, 3),
            "images_per_s": round(len(prompts) / seconds, 3)}


def ray_stage(table, args, actors: int) -> dict:
    from selma.core.config import ImagesConfig, Resources
    from selma.core.rundir import RunDir
    from selma.images.stage import image_dataset, write_images

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        dataset = image_dataset(table, args.model, ImagesConfig(steps=args.steps, guidance_scale=7.5),
                                batch_size=args.batch_size, resources=Resources(workers=actors, cpus=1), min_actors=actors)
        started = time.time()
        write_images(dataset, run)
        total = time.time() - started
        parts = sorted((os.path.getmtime(f), f) for f in run.list_files("images"))
        import pyarrow.parquet as pq

        rows = [pq.read_metadata(f).num_rows for _, f in parts]
        warm_rows = sum(rows[actors:])
        warm_seconds = parts[-1][0] - parts[actors - 1][0]
    return {"actors": actors, "seconds_total": round(total, 3),
            "warm_images_per_s": round(warm_rows / warm_seconds, 3) if warm_seconds > 0 else None,
            "cold_images_per_s": round(len(table) / total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:sd")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import pyarrow as pa
    import ray

    from selma.core.models import resolve_model
    from selma.core.ids import derived_seed

    resolve_model(args.model)
    prompts = [f"{n} red apples next to a blue chair number {i}" for i, n in
               zip(range(args.images), ["two", "three", "one"] * args.images)]
    seeds = [derived_seed(0, i) % 2**63 for i in range(args.images)]
    table = pa.table({"image_id": [f"{i:016x}" for i in range(args.images)], "prompt_id": [f"{i:016x}" for i in range(args.images)],
                      "skill": ["coco"] * args.images, "prompt": prompts, "seed": pa.array(seeds, pa.int64())})
    result = {"model": args.model, "images": args.images, "steps": args.steps, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "plain_loop": plain_loop(prompts, seeds, args)}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        result["ray_data"] = [ray_stage(table, args, actors) for actors in (1, 2)]
    finally:
        ray.shutdown()
    plain = result["plain_loop"]["images_per_s"]
    one, two = (r["warm_images_per_s"] for r in result["ray_data"])
    result["ratios"] = {"ray_1_actor_vs_plain": round(one / plain, 3), "ray_2_actors_vs_1": round(two / one, 3)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
