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
from dataclasses import asdict, dataclass
from pathlib import Path

from selma.raylib import quiet_ray_data
from selma.rundir import RunDir

PROGRESS_ACTOR = "selma-train-progress"


@dataclass(frozen=True)
class ExpertJob:
    """Everything one expert's trainer needs; plain data so it travels to Ray workers."""

    skill: str
    model: str
    run_uri: str
    resolution: int
    rank: int
    alpha: float
    init_lora_weights: str
    target_modules: tuple[str, ...]
    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_grad_norm: float
    batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    random_crop: bool
    random_flip: bool
    mixed_precision: str
    strategy: str
    zero_stage: int
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    data_cpus: float
    data_workers: int
    checkpoint_every: int
    max_failures: int
    seed: int
    progress_actor: str | None = None

    @classmethod
    def from_config(cls, config, skill: str, run: RunDir, resolution: int, progress_actor: str | None = None):
        t = config.train
        return cls(
            skill=skill, model=config.model, run_uri=run.uri, resolution=resolution, rank=t.rank, alpha=t.alpha,
            init_lora_weights=t.init_lora_weights, target_modules=tuple(t.target_modules),
            learning_rate=t.learning_rate, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
            adam_epsilon=t.adam_epsilon, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
            batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
            max_steps=t.max_steps, random_crop=t.random_crop, random_flip=t.random_flip,
            mixed_precision=t.mixed_precision, strategy=t.strategy, zero_stage=t.zero_stage,
            num_workers=t.num_workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker,
            data_cpus=t.data_cpus, data_workers=t.data_workers, checkpoint_every=t.checkpoint_every, max_failures=t.max_failures,
            seed=t.seed, progress_actor=progress_actor,
        )

    @property
    def lora(self):
        from selma.train.step import LoraSettings

        return LoraSettings(self.rank, self.alpha, self.init_lora_weights, self.target_modules)

    def deepspeed_config(self) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.max_grad_norm,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.mixed_precision == "bf16"},
            "fp16": {"enabled": self.mixed_precision == "fp16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }


class _Stepper:
    """Backward + optimizer step with gradient accumulation, for DDP and DeepSpeed alike."""

    def __init__(self, job: ExpertJob, unet, parameters):
        import torch

        self.job = job
        self.parameters = parameters
        optimizer = torch.optim.AdamW(parameters, lr=job.learning_rate, betas=(job.adam_beta1, job.adam_beta2),
                                      eps=job.adam_epsilon, weight_decay=job.weight_decay)
        if job.strategy == "deepspeed":
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=unet, optimizer=optimizer, config=job.deepspeed_config(), dist_init_required=False)
            self.model = self.engine
        else:
            import ray.train.torch

            self.engine = None
            self.optimizer = optimizer
            self.model = ray.train.torch.prepare_model(unet, move_to_device=False)
        self.micro_steps = 0

    def backward_and_step(self, loss) -> bool:
        """Returns True when this micro-batch completed an optimizer step."""
        import torch

        self.micro_steps += 1
        if self.engine is not None:
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss)
            self.engine.step()
            return boundary
        (loss / self.job.gradient_accumulation_steps).backward()
        if self.micro_steps % self.job.gradient_accumulation_steps:
            return False
        torch.nn.utils.clip_grad_norm_(self.parameters, self.job.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, directory: Path, unet, rank: int) -> None:
        import torch
        from safetensors.torch import save_file

        from selma.train.step import lora_state_dict

        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag="deepspeed")
        elif rank == 0:
            save_file(lora_state_dict(unet), str(directory / "lora.safetensors"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def restore(self, directory: Path, unet) -> None:
        import torch
        from safetensors.torch import load_file

        from selma.train.step import load_lora_state_dict

        if self.engine is not None:
            self.engine.load_checkpoint(str(directory), tag="deepspeed")
            return
        load_lora_state_dict(unet, load_file(str(directory / "lora.safetensors")))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))


def train_expert_loop(job_fields: dict) -> None:
    """Ray Train worker loop for one expert."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from selma.prompts.loop import derived_seed
    from selma.train.step import diffusion_loss, load_training_components

    job = ExpertJob(**job_fields)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    if not job.use_gpu:
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    torch.manual_seed(derived_seed(job.seed, job.skill, "init"))  # same LoRA init on every worker
    components = load_training_components(job.model, job.lora, mixed_precision=job.mixed_precision,
                                          device=str(device))
    unet = components.unet
    stepper = _Stepper(job, unet, components.lora_parameters())
    components.unet = stepper.model

    step, metrics = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            state = json.loads((directory / "state.json").read_text())
            stepper.restore(directory, unet)
            step = state["step"]
            metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
    generator = torch.Generator(device=device).manual_seed(derived_seed(job.seed, job.skill, rank, step))
    board = _progress_board(job.progress_actor) if rank == 0 else None
    autocast = torch.autocast(device.type, dtype=components.weight_dtype,
                              enabled=job.mixed_precision != "no" and job.strategy != "deepspeed")
    shard = ray.train.get_dataset_shard("train")
    window_start, window_samples, running_loss = time.time(), 0, []
    while step < job.max_steps:
        batches = 0
        for batch in shard.iter_torch_batches(batch_size=job.batch_size, drop_last=True, device=device,
                                              local_shuffle_buffer_size=4 * job.batch_size):
            batches += 1
            with autocast:
                loss = diffusion_loss(components, batch, generator)
            running_loss.append(loss.item())
            window_samples += batch["pixel_values"].shape[0] * context.get_world_size()
            if not stepper.backward_and_step(loss):
                continue
            step += 1
            elapsed = max(time.time() - window_start, 1e-9)
            record = {"step": step, "loss": sum(running_loss) / len(running_loss),
                      "lr": job.learning_rate, "samples_per_s": window_samples / elapsed}
            metrics.append(record)
            window_start, window_samples, running_loss = time.time(), 0, []
            if board is not None:
                board.update.remote(job.skill, step, job.max_steps, record["loss"])
            if step % job.checkpoint_every == 0 or step == job.max_steps:
                _report_checkpoint(stepper, unet, rank, step, metrics)
            if step >= job.max_steps:
                break
        if batches == 0:
            raise RuntimeError(f"expert {job.skill!r}: its data yields no full batch of {job.batch_size}")
    if rank == 0:
        _write_expert(job, unet, metrics)


def _report_checkpoint(stepper: _Stepper, unet, rank: int, step: int, metrics: list[dict]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="selma-ckpt-") as directory:
        directory = Path(directory)
        stepper.save(directory, unet, rank)
        if rank == 0:
            (directory / "state.json").write_text(json.dumps({"step": step}))
            (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        has_files = any(directory.iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if has_files else None
        ray.train.report({"step": step, "loss": metrics[-1]["loss"]}, checkpoint=checkpoint)


def _write_expert(job: ExpertJob, unet, metrics: list[dict]) -> None:
    from selma.merge.lora_io import save_unet_lora

    with tempfile.TemporaryDirectory(prefix="selma-expert-") as directory:
        directory = Path(directory)
        save_unet_lora(unet, directory, lora_config=job.lora.peft_config(), base_model=job.model,
                       extra_metadata={"skill": job.skill, "steps": str(job.max_steps)})
        (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (directory / "README.md").write_text(model_card(job, metrics))
        RunDir(job.run_uri).put_dir(directory, f"experts/{job.skill}")


def model_card(job: ExpertJob, metrics: list[dict]) -> str:
    settings = {k: v for k, v in asdict(job).items() if k not in ("run_uri", "progress_actor")}
    final = metrics[-1]["loss"] if metrics else float("nan")
    return (
        f"---\nlibrary_name: diffusers\nbase_model: {job.model}\ntags:\n- lora\n- selma\n- text-to-image\n---\n\n"
        f"# SELMA expert: `{job.skill}`\n\n"
        f"A LoRA (rank {job.rank}, alpha {job.alpha}) on the UNet attention projections of `{job.model}`, "
        f"fine-tuned by selma on auto-generated `{job.skill}` prompts and the model's own images.\n\n"
        f"Final training loss: {final:.4f} after {job.max_steps} steps.\n\n"
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


def _progress_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class TrainProgress:
        def __init__(self):
            self.state: dict[str, tuple[int, int, float]] = {}

        def update(self, skill: str, step: int, total: int, loss: float) -> None:
            self.state[skill] = (step, total, loss)

        def snapshot(self) -> dict:
            return dict(self.state)

    return TrainProgress


def fit_expert(job: ExpertJob) -> dict:
    """Build and run one skill's TorchTrainer (called inside a Ray task)."""
    import pyarrow.parquet as pq
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selma.train.data import prepare_training_batch

    quiet_ray_data()
    run = RunDir(job.run_uri)
    files = run.list_files("images", job.skill)
    # One streaming execution covers every epoch: each pass re-decodes and re-augments its rows,
    # without restarting a Ray Data execution per epoch.
    rows = sum(pq.read_metadata(f, filesystem=run.fs).num_rows for f in files)
    samples = job.max_steps * job.batch_size * job.gradient_accumulation_steps * job.num_workers
    epochs = max(1, math.ceil(samples / max(rows, 1)))
    dataset = ray.data.read_parquet(files * epochs, filesystem=run.fs, num_cpus=job.data_cpus,
                                    concurrency=job.data_workers)
    dataset = dataset.map_batches(
        prepare_training_batch,
        compute=ray.data.TaskPoolStrategy(size=job.data_workers),
        fn_kwargs={"model": job.model, "resolution": job.resolution, "random_crop": job.random_crop,
                   "random_flip": job.random_flip},
        batch_size=job.batch_size,
        num_cpus=job.data_cpus,
        batch_format="numpy",
    )
    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    trainer = TorchTrainer(
        train_expert_loop,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"expert-{job.skill}", storage_path=run.uri_of("_work", "train"),
                             failure_config=FailureConfig(max_failures=job.max_failures)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    return {"skill": job.skill, "metrics": result.metrics}


def check_fits_cluster(config) -> None:
    """Fail fast when one expert's workers could never be placed (Ray Train would wait forever)."""
    import ray

    t = config.train
    total = ray.cluster_resources()
    need_cpu = t.num_workers * t.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise RuntimeError(f"train: one expert needs {need_cpu} CPUs (num_workers × cpus_per_worker) "
                           f"but the cluster has {total.get('CPU', 0)}")
    if t.use_gpu and t.num_workers > total.get("GPU", 0):
        raise RuntimeError(f"train: one expert needs {t.num_workers} GPUs but the cluster has "
                           f"{total.get('GPU', 0)}; set train.use_gpu=false to train on CPUs")


def run_train_stage(config, run: RunDir, progress=print, poll_seconds: float = 5.0) -> dict:
    """Train every skill's expert concurrently; skills already finished are skipped."""
    import ray

    from selma.images.generator import native_resolution

    counts = _image_counts(run)
    empty = [s for s in config.skills.names if counts.get(s, 0) < config.train.batch_size]
    if empty:
        raise RuntimeError(
            f"train: skill(s) {empty} have fewer images than train.batch_size={config.train.batch_size} "
            f"(images per skill: {counts})")
    check_fits_cluster(config)
    resolution = config.train.resolution or native_resolution(config.model)
    finished = run.stage("train").get("experts", {})
    todo = [s for s in config.skills.names if s not in finished or not run.exists("experts", s)]
    skipped = [s for s in config.skills.names if s not in todo]
    if skipped:
        progress(f"[train] experts already trained, skipped: {', '.join(skipped)}")
    board_name = f"{PROGRESS_ACTOR}-{time.time_ns()}"
    board = _progress_actor_class().options(name=board_name).remote()
    launch = ray.remote(num_cpus=0)(fit_expert)
    pending = {launch.remote(ExpertJob.from_config(config, s, run, resolution, board_name)): s for s in todo}
    failures: dict[str, str] = {}
    started, last_snapshot = time.time(), None
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_seconds)
        for ref in ready:
            skill = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # one expert failing must not hide the others' results
                failures[skill] = f"{type(err).__name__}: {err}"
                progress(f"[train] expert {skill} FAILED: {failures[skill][:500]}")
                continue
            finished[skill] = {"loss": result["metrics"].get("loss"), "seconds": round(time.time() - started, 1)}
            run.update_stage("train", experts=finished)
            progress(f"[train] expert {skill} done: loss {finished[skill]['loss']:.4f}")
        snapshot = ray.get(board.snapshot.remote())
        if pending and snapshot and snapshot != last_snapshot:
            last_snapshot = snapshot
            progress("[train] " + " | ".join(f"{s} {st}/{total} loss {loss:.3f}"
                                             for s, (st, total, loss) in sorted(snapshot.items())))
    ray.kill(board)
    if failures:
        raise RuntimeError(f"train: expert(s) failed: {failures}")
    return {"experts": finished, "resolution": resolution}


def _image_counts(run: RunDir) -> dict[str, int]:
    from selma.images.stage import count_per_skill

    return count_per_skill(run.read_table("images", columns=["skill"]))
