"""LoRA experts with Ray Train: one ``TorchTrainer`` per skill, all launched at once.

Each trainer is started from its own Ray task (``num_cpus=0``), so the trainers run side by side
and simply queue for workers when the cluster cannot hold them all. Data reaches the workers
through ``datasets=`` / ``get_dataset_shard``, decoded and tokenised by Ray Data on CPUs.
Checkpoints (LoRA, optimizer, step, metrics) go to the run's storage; a restarted worker, or a
rerun after the driver died, continues from the latest one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from selma.core.config import JOINT_EXPERT
from selma.core.errors import ConfigError
from selma.core.expert_steps import CHECKPOINTS_DIR, check_select
from selma.core.ids import derived_seed
from selma.core.progress import Progress
from selma.core.rundir import RunDir
from selma.core.stage import StageBase, StageContext
from selma.core.vae import check_vae
from selma.images.generator import native_resolution
from selma.images.stage import count_per_skill
from selma.merge.lora_io import save_peft_state_dict
from selma.raylib import quiet_ray_data
from selma.train.cache import CacheSpec, cached_rows_per_block, fill_latent_cache, read_cached
from selma.train.checkpoints import write_checkpoint
from selma.train.data import epoch_plan, read_and_prepare, rows_per_block
from selma.train.recipe import check_optimizer_available
from selma.train.step import LoraTrainStep, check_lora_targets, load_training_components, peft_lora_config
from selma.train.tracking import ExpertMonitor, TrackingTarget, check_tracking, open_tracker
from selma.train.validation import ValidationPlan, Validator, validation_plan

# Ray Train, torch and the train step's libraries are imported where used: the pipeline imports
# every stage module, and the vLLM venv that runs the prompt stage has no diffusers or peft.

if TYPE_CHECKING:
    from selma.core.config import TrainConfig

PROGRESS_ACTOR = "selma-train-progress"


@dataclass(frozen=True)
class ExpertJob:
    """What one expert's trainer needs: the config's ``train`` section and what that section does not
    say (which expert, its skills, the model, the run, the image size). It travels to the Ray Train
    workers."""

    name: str  # a skill, or "joint"
    skills: tuple[str, ...]  # the skills whose images it trains on
    model: str
    run_uri: str
    resolution: int
    train: TrainConfig
    progress_actor: str | None = None
    cache: str | None = None  # the latent cache's folder in the run (train.cache_latents), else None
    run_name: str = "selma"
    validation: ValidationPlan | None = None
    vae: str | None = None  # the config's VAE override

    @classmethod
    def from_config(cls, config, expert: str, run: RunDir, resolution: int):
        joint = expert == JOINT_EXPERT and config.train.mode == "joint"
        skills = tuple(config.skills.names) if joint else (expert,)
        return cls(name=expert, skills=skills, model=config.model, run_uri=run.uri, resolution=resolution,
                   train=config.train, vae=config.vae, run_name=config.name,
                   validation=validation_plan(config, skills, run, resolution))


def train_expert_loop(loop_config: dict) -> None:
    """Ray Train worker loop for one expert: ``loop_config["job"]`` is its :class:`ExpertJob`."""
    import ray.train
    import ray.train.torch
    import torch

    job: ExpertJob = loop_config["job"]
    t = job.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if t.resources.gpus else torch.device("cpu")
    if t.resources.cpu_threads:
        torch.set_num_threads(t.resources.cpu_threads)
    torch.manual_seed(derived_seed(t.seed, job.name, "init"))  # same LoRA init on every worker
    components = load_training_components(job.model, t, device=str(device), vae=job.vae)
    trainer = LoraTrainStep(components, t, seed=derived_seed(t.seed, job.name, rank))
    metrics: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(directory, rank)
            metrics = _read_metrics(Path(directory) / "metrics.jsonl")[: trainer.step]
    board = _progress_board(job.progress_actor) if rank == 0 else None
    if checkpoint and board is not None:
        board.resumed.remote(job.name, trainer.step)
    monitor = expert_monitor(job, trainer.step) if rank == 0 else ExpertMonitor()
    exported: tuple[int, dict | None] = (-1, None)  # the step last exported, and its LoRA
    try:
        shard = ray.train.get_dataset_shard("train")
        window_start, window_samples, window_losses = None, 0, []
        while trainer.step < t.max_steps:
            batches = 0
            for batch in shard.iter_torch_batches(batch_size=t.batch_size, drop_last=True, device=device,
                                                  local_shuffle_buffer_size=4 * t.batch_size):
                batches += 1
                window_start = window_start or time.time()
                loss, stepped = trainer.train_micro_batch(batch)
                window_losses.append(loss)
                window_samples += len(next(iter(batch.values()))) * world_size
                if not stepped:
                    continue
                elapsed = max(time.time() - window_start, 1e-9)
                record = {"step": trainer.step, "loss": sum(window_losses) / len(window_losses),
                          "lr": trainer.current_lr, "samples_per_s": round(window_samples / elapsed, 3),
                          "grad_norm": trainer.grad_norm}
                metrics.append(record)
                monitor.after_step(trainer, record)
                window_start, window_samples, window_losses = time.time(), 0, []
                if board is not None:
                    board.update.remote(job.name, trainer.step, t.max_steps, record["loss"])
                if trainer.step % t.checkpoint_every == 0 or trainer.step == t.max_steps:
                    # The exported LoRA first: a step Ray Train resumes from always has its export.
                    exported = (trainer.step, write_checkpoint(trainer, rank, run_uri=job.run_uri, expert=job.name,
                                                               base_model=job.model, loss=record["loss"]))
                    _report_checkpoint(trainer, rank, metrics)
                if trainer.step >= t.max_steps:
                    break
            if batches == 0:
                raise RuntimeError(f"expert {job.name!r}: its data yields no full batch of {t.batch_size}")
    finally:  # a crashed worker's tracking run is ended too
        monitor.close()
    # The last step was just exported (on every rank alike); gathering again is a collective under ZeRO-3.
    state = exported[1] if exported[0] == trainer.step else trainer.lora_state_dict()
    if rank == 0:
        _write_expert(job, state, metrics)


def expert_monitor(job: ExpertJob, resumed_step: int = 0) -> ExpertMonitor:
    """Rank 0's tracker and validator of ``job`` (either may be off); a fresh start (step 0)
    removes an earlier attempt's validation images."""
    t = job.train
    tracker = None
    if t.tracking is not None:
        params = {"expert": job.name, "skills": list(job.skills), "model": job.model, "resolution": job.resolution,
                  "train": t.model_dump(mode="json", exclude={"tracking"})}
        tracker = open_tracker(t.tracking, TrackingTarget(job.run_name, job.run_uri, job.name, params, resumed_step))
    validator = None
    if job.validation is not None:
        validator = Validator(job.validation, model=job.model, run_uri=job.run_uri, expert=job.name,
                              max_steps=t.max_steps, mixed_precision=t.mixed_precision)
        if resumed_step == 0:
            validator.clear()
    return ExpertMonitor(tracker, validator)


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _report_checkpoint(trainer, rank: int, metrics: list[dict]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="selma-ckpt-") as directory:
        directory = Path(directory)
        trainer.save_checkpoint(directory, rank)
        if rank == 0:
            (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        ray.train.report({"step": trainer.step, "loss": metrics[-1]["loss"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def _write_expert(job: ExpertJob, lora_state: dict, metrics: list[dict]) -> None:
    with tempfile.TemporaryDirectory(prefix="selma-expert-") as directory:
        directory = Path(directory)
        save_peft_state_dict(lora_state, peft_lora_config(job.train), directory, base_model=job.model,
                             extra_metadata={"skill": job.name, "steps": str(job.train.max_steps)})
        (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (directory / "README.md").write_text(model_card(job, metrics))
        RunDir(job.run_uri).put_dir(directory, f"experts/{job.name}", keep=(CHECKPOINTS_DIR, "validation"))


def model_card(job: ExpertJob, metrics: list[dict]) -> str:
    t = job.train
    settings = {"skill": job.name, "skills": list(job.skills), "model": job.model, "resolution": job.resolution,
                **({"vae": job.vae} if job.vae else {}), "train": t.model_dump(mode="json")}
    final = metrics[-1]["loss"] if metrics else float("nan")
    return (
        f"---\nlibrary_name: diffusers\nbase_model: {job.model}\ntags:\n- lora\n- selma\n- text-to-image\n---\n\n"
        f"# SELMA expert: `{job.name}`\n\n"
        f"A LoRA (rank {t.rank}, alpha {t.alpha}) on the UNet attention projections of `{job.model}`, "
        f"fine-tuned by selma on auto-generated prompts of the skill(s) {', '.join(job.skills)} "
        "and the model's own images.\n\n"
        f"Final training loss: {final:.4f} after {t.max_steps} steps.\n\n"
        "```python\nfrom diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({job.model!r})\npipe.load_lora_weights('<this folder>')\n```\n\n"
        "## Training settings\n\n```json\n" + json.dumps(settings, indent=2, default=str) + "\n```\n"
    )


def _progress_board(name: str | None):
    import ray

    if not name:
        return None
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def _skip_reporter(board):
    if board is None:
        return None

    def report(rows: list[dict]) -> None:
        board.skipped.remote(rows)

    return report


def _progress_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class TrainProgress:
        def __init__(self):
            self.state: dict[str, tuple[int, int, float]] = {}
            self.resumes: list[tuple[str, int]] = []
            self.skips: list[dict] = []
            self.seen: set[tuple[str, str]] = set()

        def update(self, skill: str, step: int, total: int, loss: float) -> None:
            self.state[skill] = (step, total, loss)

        def resumed(self, skill: str, step: int) -> None:
            self.resumes.append((skill, step))

        def skipped(self, rows: list[dict]) -> None:
            for row in rows:
                if (row["skill"], row["image_id"]) not in self.seen:
                    self.seen.add((row["skill"], row["image_id"]))
                    self.skips.append(row)

        def snapshot(self) -> dict:
            return {"state": dict(self.state), "resumes": list(self.resumes), "skipped": list(self.skips)}

    return TrainProgress


def fit_expert(job: ExpertJob) -> dict:
    """Build and run one skill's TorchTrainer (called inside a Ray task)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    quiet_ray_data()
    t = job.train
    run = RunDir(job.run_uri)
    files = [f for skill in job.skills for f in run.list_files(job.cache or "images", skill)]
    rows = sum(run.parquet_rows(f) for f in files)
    samples = t.max_steps * t.effective_batch_size
    plan = epoch_plan(files, max(1, math.ceil(samples / max(rows, 1))), derived_seed(t.seed, job.name, "epochs"))
    report_skipped = _skip_reporter(_progress_board(job.progress_actor))
    if job.cache:
        read, read_kwargs = read_cached, {"rows_per_batch": cached_rows_per_block(run, files, t.batch_size),
                                          "random_flip": t.random_flip}
    else:
        read, read_kwargs = read_and_prepare, {"model": job.model, "resolution": job.resolution,
                                               "rows_per_batch": rows_per_block(job.resolution, t.batch_size),
                                               "random_crop": t.random_crop, "random_flip": t.random_flip}
    dataset = ray.data.from_items(plan, override_num_blocks=min(len(plan), 1000)).map_batches(
        read,
        compute=ray.data.TaskPoolStrategy(size=t.data_workers),
        fn_kwargs={"run_uri": job.run_uri, "report_skipped": report_skipped, **read_kwargs},
        batch_size=16,  # files per call; their rows are re-batched into blocks of rows_per_block
        num_cpus=t.data_cpus,
        batch_format="numpy",
    )
    trainer = TorchTrainer(
        train_expert_loop,
        train_loop_config={"job": job},
        scaling_config=t.resources.scaling_config(),
        run_config=RunConfig(name=f"expert-{job.name}", storage_path=run.uri_of("_work", "train"),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    return {"skill": job.name, "metrics": result.metrics}


def expert_resources(t) -> dict[str, float]:
    """What one expert holds while it trains: its workers, plus the CPUs its Ray Data pipeline needs.

    Ray Data hands the CPUs left beside running trainers to concurrent datasets in whole CPUs, so
    each expert's data pipeline counts for at least one whole CPU.
    """
    need = t.resources.total()
    need["CPU"] += max(1, math.ceil(t.data_workers * t.data_cpus))
    return need


def experts_at_once(config) -> int:
    """How many experts train side by side; the rest queue.

    With ``train.max_concurrent_experts`` set, that number is trusted: an autoscaling cluster may
    have no GPU node up yet. Otherwise the cluster's current resources decide, and a cluster on
    which not even one expert fits fails fast (Ray Train, or its data pipeline, would wait forever).
    """
    import ray

    t = config.train
    if t.max_concurrent_experts:
        return t.max_concurrent_experts
    total = ray.cluster_resources()
    need = expert_resources(t)
    hint = "; on an autoscaling cluster set train.max_concurrent_experts"
    if need["CPU"] > total.get("CPU", 0):
        raise RuntimeError(f"train: one expert needs {need['CPU']} CPUs (train.resources: workers × cpus for "
                           f"its workers, and at least one whole CPU for its data pipeline) but the cluster "
                           f"has {total.get('CPU', 0)}{hint}")
    if need["GPU"] > total.get("GPU", 0):
        raise RuntimeError(f"train: one expert needs {need['GPU']:g} GPUs but the cluster has "
                           f"{total.get('GPU', 0):g}; set train.resources.gpus=0 to train on CPUs{hint}")
    short = {name: amount for name, amount in need.items() if name not in ("CPU", "GPU") and amount > total.get(name, 0)}
    if short:
        raise RuntimeError(f"train: one expert needs the custom resources {short} (train.resources.custom × "
                           f"workers) but the cluster has {({n: total.get(n, 0) for n in short})}{hint}")
    return max(1, min(int(total.get(kind, 0) // amount) for kind, amount in need.items() if amount > 0))


def preflight_train(config, run: RunDir | None = None) -> None:
    """Checks of the train settings against the model (and the tracking backend against this
    environment), before any stage of the run starts."""
    try:
        check_lora_targets(config.model, config.train)
    except ValueError as err:
        raise ConfigError(f"{err}") from None
    check_select(config.train)  # the merge stage's, checked here too: a run fails before it trains
    check_tracking(config.train.tracking, run or RunDir(config.resolved_run_dir()))
    check_optimizer_available(config.train)
    check_vae(config.vae, config.model)


class TrainStage(StageBase):
    """One LoRA expert per skill (or one ``joint``), all trained at once with Ray Train."""

    name = "train"
    reads = ("images",)
    writes = ("experts",)
    sections = ("model", "vae", "train")
    needs = "images"

    def preflight(self, config, run: RunDir) -> None:
        preflight_train(config, run)

    def run(self, ctx: StageContext) -> dict:
        return run_train_stage(ctx.config, ctx.run, ctx.progress)


def run_train_stage(config, run: RunDir, progress=None) -> dict:
    """Train every expert concurrently (one per skill, or one ``joint``); finished experts are skipped."""
    import ray

    progress = Progress.of(progress)

    t = config.train  # preflight_train already ran (pipeline.run_stages, before any stage)
    at_once = experts_at_once(config)
    counts = _image_counts(run)
    counts = {s: counts.get(s, 0) for s in config.skills.names}
    resolution = t.resolution or native_resolution(config.model)
    jobs = {name: ExpertJob.from_config(config, name, run, resolution) for name in config.expert_names}
    short = [name for name, job in jobs.items() if sum(counts[s] for s in job.skills) < t.batch_size * t.resources.workers]
    if short:
        raise RuntimeError(
            f"train: expert(s) {sorted(short)} have fewer images than train.batch_size × train.resources.workers "
            f"= {t.batch_size * t.resources.workers} (images per skill: {counts})")
    finished = run.stage("train").get("experts", {})
    todo = [name for name in jobs if name not in finished or not run.exists("experts", name)]
    already = [name for name in jobs if name not in todo]
    if already:
        progress(f"[train] experts already trained, skipped: {', '.join(already)}")
    cache = None
    if t.cache_latents and todo:
        spec = CacheSpec.for_run(config, run, resolution)
        cache = fill_latent_cache(run, spec, sorted({s for name in todo for s in jobs[name].skills}),
                                  resources=t.resources, actors=at_once * t.resources.workers,
                                  batch_size=t.batch_size, progress=progress)
        jobs = {name: replace(job, cache=spec.folder) for name, job in jobs.items()}
    board_name = f"{PROGRESS_ACTOR}-{time.time_ns()}"
    board = _progress_actor_class().options(name=board_name).remote()
    launch = ray.remote(num_cpus=0)(fit_expert)
    queue, pending = list(todo), {}
    if len(queue) > at_once:
        progress(f"[train] {len(queue)} experts, {at_once} at a time (cluster resources); the rest queue")
    failures: dict[str, str] = {}
    started, resumes_reported, skips_reported = time.time(), 0, 0
    steps: dict = {}  # a counter per expert, from its launch
    while queue or pending:
        while queue and len(pending) < at_once:
            name = queue.pop(0)
            pending[launch.remote(replace(jobs[name], progress_actor=board_name))] = name
            steps[name] = progress.counter(f"train {name}", total=t.max_steps, unit="steps")
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress.poll_s)
        for ref in ready:
            name = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # one expert failing must not hide the others' results
                failures[name] = f"{type(err).__name__}: {err}"
                progress(f"[train] expert {name} FAILED: {failures[name][:500]}")
                continue
            finished[name] = {"loss": result["metrics"].get("loss"), "seconds": round(time.time() - started, 1)}
            run.update_stage("train", experts=finished)
            steps[name].update(t.max_steps, f"loss {finished[name]['loss']:.3f}")
            steps.pop(name).close()
            progress(f"[train] expert {name} done: loss {finished[name]['loss']:.4f}")
        snapshot = ray.get(board.snapshot.remote())
        for name, step in snapshot["resumes"][resumes_reported:]:
            progress(f"[train] expert {name}: resumed from its checkpoint at step {step}")
        resumes_reported = len(snapshot["resumes"])
        for row in snapshot["skipped"][skips_reported:]:
            progress(f"[train] {row['skill']}: skipping unusable image {row['image_id']} ({row['problem']})")
        skips_reported = len(snapshot["skipped"])
        for name, (step, _, loss) in snapshot["state"].items():
            if name in steps:
                steps[name].update(step, f"loss {loss:.3f}")
    for counter in steps.values():
        counter.close()
    skipped: dict[str, list[dict]] = {}
    for row in ray.get(board.snapshot.remote())["skipped"]:
        skipped.setdefault(row["skill"], []).append({"image_id": row["image_id"], "problem": row["problem"]})
    ray.kill(board)
    if failures:
        raise RuntimeError(f"train: expert(s) failed: {failures}")
    return {"experts": finished, "resolution": resolution, "mode": t.mode,
            "skipped_images": {skill: rows[:100] for skill, rows in skipped.items()},
            **({"latent_cache": cache} if cache else {})}


def _image_counts(run: RunDir) -> dict[str, int]:
    return count_per_skill(run.read_table("images", columns=["skill"]))
