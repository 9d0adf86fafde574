"""CPU benchmark of the train stage, one run, same tiny UNet, batch and thread count throughout.

* samples/s of the plain single-process loop (selma's train step, PNGs decoded in the loop, no Ray),
  of Ray Train with 1 worker under DDP and under DeepSpeed (ZeRO-2), data through Ray Data;
* wall time of the train stage for 2 experts side by side vs. one after the other.

Steady-state samples/s leave out the first ``--warmup`` optimizer steps (model load, first batches).
Prints JSON.

    python jobs/bench_train.py                 # about 6 minutes on 2 cores
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


def plain_loop(run_dir: Path, skill: str, config, warmup: int) -> float:
    import pyarrow.parquet as pq
    import torch

    from selma.train.data import PrepareTrainingBatch
    from selma.train.step import LoraTrainStep, load_training_components

    t = config.train
    torch.set_num_threads(int(t.resources.cpus))
    rows = pq.ParquetDataset(sorted((run_dir / "images" / skill).glob("*.parquet"))).read().to_pydict()
    prepare = PrepareTrainingBatch(config.model, 64)
    torch.manual_seed(0)
    components = load_training_components(config.model, t)
    trainer = LoraTrainStep(components, t, seed=0)
    images = {"image": rows["image"], "prompt": rows["prompt"]}
    started = None
    for step in range(t.max_steps):
        if step == warmup:
            started = time.perf_counter()
        start = (step * t.batch_size) % (len(images["image"]) - t.batch_size + 1)
        batch, _ = prepare({k: v[start:start + t.batch_size] for k, v in images.items()})
        trainer.train_micro_batch({k: torch.from_numpy(v) for k, v in batch.items()})
    return round((t.max_steps - warmup) * t.batch_size / (time.perf_counter() - started), 3)


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
        results["plain_loop_samples_per_s"] = plain_loop(images, SKILLS[0], config, args.warmup)

        sequential_wall, ddp = train(fresh("ddp-sequential"), base, ["train.strategy=ddp",
                                                                     "train.max_concurrent_experts=1"])
        concurrent_wall, _ = train(fresh("ddp-concurrent"), base, ["train.strategy=ddp"])
        _, deepspeed = train(fresh("deepspeed"), base, ["train.strategy=deepspeed", "train.zero_stage=2",
                                                         "train.max_concurrent_experts=1"])
    ray.shutdown()
    plain = results["plain_loop_samples_per_s"]
    for name, metrics in (("ray_train_1_worker_ddp", ddp), ("ray_train_1_worker_deepspeed", deepspeed)):
        rate = steady_samples_per_s(metrics[SKILLS[0]], args.batch, args.warmup)
        results[f"{name}_samples_per_s"] = rate
        results[f"{name}_vs_plain"] = round(rate / plain, 3)
    results["two_experts_sequential_wall_s"] = sequential_wall
    results["two_experts_concurrent_wall_s"] = concurrent_wall
    results["concurrent_vs_sequential_wall"] = round(concurrent_wall / sequential_wall, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
