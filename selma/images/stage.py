"""The image stage: prompts → ``map_batches`` over an actor pool of generators → Parquet shards.

Rows are written as they are produced, by a Ray Data datasink that writes each block atomically
into ``images/<skill>/``; rows that fail land in ``errors/images/`` with their reason. A rerun
skips every ``image_id`` already written.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from selma.core.ids import image_id, image_seed
from selma.core.progress import Progress
from selma.core.rundir import RunDir, local_folder, new_part_name
from selma.core.stage import StageBase, StageContext
from selma.core.vae import check_vae
from selma.images.export import HF_FEATURES, OPTIONAL_COLUMNS, dataset_card, with_hf_features
from selma.images.generator import ImageGenerator, png_bytes

# torch is imported where used, in the generator actors (the vLLM venv imports this module too).

if TYPE_CHECKING:
    from selma.core.config import ImagesConfig, Resources

# The contract of images/<skill>/*.parquet, in order; prompt_truncated follows with images.truncate_prompts.
IMAGE_COLUMNS = [name for name in HF_FEATURES if name not in OPTIONAL_COLUMNS]


def planned_images(prompts: pa.Table, images_per_prompt: int, base_seed: int) -> pa.Table:
    """One row per image to draw: image_id, prompt_id, skill, prompt, seed."""
    rows = []
    for row in prompts.select(["prompt_id", "skill", "prompt"]).to_pylist():
        for index in range(images_per_prompt):
            identifier = image_id(row["prompt_id"], index)
            rows.append({"image_id": identifier, **row, "seed": image_seed(base_seed, identifier)})
    schema = pa.schema([("image_id", pa.string()), ("prompt_id", pa.string()), ("skill", pa.string()),
                        ("prompt", pa.string()), ("seed", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def image_ids(run: RunDir, folder: str = "images") -> set[str]:
    """The ids of the image rows (or error rows) under ``folder`` of ``run``."""
    table = run.read_table(*folder.split("/"), columns=["image_id"])
    return set() if table is None else set(table.column("image_id").to_pylist())


def not_yet_drawn(plan: pa.Table, done: set[str]) -> pa.Table:
    """The rows of ``plan`` whose image is not among ``done``: what a rerun still draws."""
    return plan.filter(pc.invert(pc.is_in(plan.column("image_id"), pa.array(sorted(done), pa.string()))))


def check_error_rate(planned: int, failed: int, max_error_rate: float, errors_uri: str, what: str = "images") -> None:
    """Fail the stage when more than ``images.max_error_rate`` of the planned images failed."""
    if planned and failed / planned > max_error_rate:
        raise RuntimeError(f"{failed} of {planned} {what} failed (more than images.max_error_rate="
                           f"{max_error_rate}); reasons are in {errors_uri}")


class GenerateImages:
    """Ray Data callable class: one pipeline per actor, a batch of rows in, rows with PNGs out."""

    def __init__(self, model: str, settings: ImagesConfig, num_threads: int | None = None,
                 lora: str | None = None, vae: str | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)

        self.generator = ImageGenerator(model, settings, lora=local_folder(lora) if lora else None, vae=vae)
        self.model = model
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        images: list[bytes | None] = [None] * len(prompts)
        errors: list[str | None] = [None] * len(prompts)
        try:
            for i, image in enumerate(self.generator.generate(prompts, seeds)):
                images[i] = png_bytes(image)
        except Exception:  # retry one by one so one bad prompt does not sink its batch
            for i in range(len(prompts)):
                try:
                    images[i] = png_bytes(self.generator.generate([prompts[i]], [seeds[i]])[0])
                except Exception as err:  # recorded in errors/images with its reason
                    errors[i] = f"{type(err).__name__}: {err}"[:2000]
        size = self.generator.resolution
        n = len(prompts)
        rows = {
            **{key: batch[key] for key in ("image_id", "prompt_id", "skill", "prompt", "seed")},
            "image": np.array(images, dtype=object),
            "width": np.full(n, size, dtype=np.int32),
            "height": np.full(n, size, dtype=np.int32),
            "model": np.array([self.model] * n, dtype=object),
            "steps": np.full(n, self.settings.steps, dtype=np.int32),
            "guidance_scale": np.full(n, self.settings.guidance_scale, dtype=np.float32),
            "error": np.array(errors, dtype=object),
        }
        if self.settings.truncate_prompts:
            overflows = self.generator.prompt_overflows(prompts)
            rows["prompt_truncated"] = np.array([reason is not None for reason in overflows], dtype=bool)
        return rows


def _image_sink(run_uri: str, images_dir: str = "images", errors_dir: str = "errors/images"):
    from ray.data import Datasink

    class ImageParquetSink(Datasink):
        """Writes each block's rows per skill as one atomic Parquet file; failed rows to errors/."""

        def __init__(self, uri: str):
            self.uri = uri

        def write(self, blocks, ctx) -> dict:
            run = RunDir(self.uri)
            written = failed = 0
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
                if table.num_rows == 0:
                    continue
                is_error = pc.invert(pc.is_null(table.column("error")))
                errors = table.filter(is_error).drop_columns(["image"])
                good = table.filter(pc.invert(is_error))
                good = good.select(IMAGE_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in good.column_names])
                if errors.num_rows:
                    run.write_table(f"{errors_dir}/{new_part_name()}", errors)
                    failed += errors.num_rows
                for skill in pc.unique(good.column("skill")).to_pylist():
                    part = good.filter(pc.equal(good.column("skill"), skill))
                    run.write_table(f"{images_dir}/{skill}/{new_part_name()}", with_hf_features(part))
                    written += part.num_rows
            return {"written": written, "failed": failed}

    return ImageParquetSink(run_uri)


class ImageStage(StageBase):
    """Every written prompt's images, drawn on a pool of generator actors (Ray Data)."""

    name = "images"
    reads = ("prompts",)
    writes = ("images",)
    sections = ("model", "vae", "images")
    needs = "prompts"

    def preflight(self, config, run: RunDir) -> None:
        check_vae(config.image_vae, config.image_model)

    def run(self, ctx: StageContext) -> dict:
        return run_image_stage(ctx.config, ctx.run, ctx.progress, prompt_stream=ctx.stream)


def run_image_stage(config, run: RunDir, progress=None, prompt_stream=None) -> dict:
    """Draw every written prompt's images that are not yet written.

    ``prompt_stream`` (a Ray Dataset of prompt rows, see :mod:`selma.prompts.stage`) adds the
    prompts the prompt loop is still producing: ``selma run`` draws them as they are accepted.
    """
    progress = Progress.of(progress)
    _, done, todo = _image_plan(config, run)
    if done:
        progress(f"[images] {len(done)} images already written, {todo.num_rows} more to draw for written prompts")
    started = time.time()
    if todo.num_rows or prompt_stream is not None:
        _draw(config, run, _planned_dataset(config, todo, prompt_stream), todo.num_rows if prompt_stream is None else None,
              progress)
    seconds = time.time() - started
    plan, _, _ = _image_plan(config, run)
    written_table = run.read_table("images", columns=["image_id", "skill"])
    written = set() if written_table is None else set(written_table.column("image_id").to_pylist())
    failed_ids = image_ids(run, "errors/images") - written
    drawn = len(written) - len(done)
    rate = drawn / max(seconds, 1e-9)
    progress(f"[images] drew {drawn} images in {seconds:.1f}s ({rate:.2f} images/s); {len(failed_ids)} failed")
    missing = plan.num_rows - len(written & set(plan.column("image_id").to_pylist())) - len(failed_ids)
    if missing > 0:
        raise RuntimeError(f"{missing} planned images were neither written nor recorded as failed; rerun to draw them")
    check_error_rate(plan.num_rows, len(failed_ids), config.images.max_error_rate, run.uri_of("errors", "images"))
    counts = count_per_skill(written_table)
    run.write_bytes("images/README.md", dataset_card(config, counts).encode())
    return {"counts": counts, "failed": len(failed_ids), "images_per_second": round(rate, 3)}


def prompts_to_draw(prompts: pa.Table, skills: list[str]) -> pa.Table:
    """The rows of a prompts table that get images: the LLM-written prompts of ``skills`` (not the
    skills' seed examples)."""
    prompts = prompts.filter(pc.equal(prompts.column("origin"), "llm"))
    return prompts.filter(pc.is_in(prompts.column("skill"), pa.array(skills)))


def _image_plan(config, run: RunDir) -> tuple[pa.Table, set[str], pa.Table]:
    """(every planned image of the written prompts, the ids already written, those still to draw)."""
    prompts = run.read_table("prompts")
    if prompts is None:
        raise RuntimeError(f"no prompts in {run.uri}; run the prompt stage first")
    plan = planned_images(prompts_to_draw(prompts, config.skills.names), config.images.images_per_prompt,
                          config.images.seed)
    done = image_ids(run) & set(plan.column("image_id").to_pylist())
    return plan, done, not_yet_drawn(plan, done)


def _planned_dataset(config, todo: pa.Table, prompt_stream):
    """Planned image rows: those of written prompts, then those of the prompts still streaming in."""
    written = ray.data.from_arrow(batched_blocks(todo, config.images.batch_size)) if todo.num_rows else None
    if prompt_stream is None:
        return written
    streamed = prompt_stream.map_batches(
        planned_images, fn_kwargs={"images_per_prompt": config.images.images_per_prompt, "base_seed": config.images.seed},
        batch_format="pyarrow", batch_size=None, num_cpus=0)
    return streamed if written is None else written.union(streamed)


def _draw(config, run: RunDir, planned, total: int | None, progress: Progress) -> None:
    """Run the Ray Data pipeline in a thread; report progress from the files it has written."""
    import threading

    cfg = config.images
    dataset = draw_images(planned, config.image_model, cfg, batch_size=cfg.batch_size, resources=cfg.resources,
                          vae=config.image_vae)
    failure: list[BaseException] = []

    def write() -> None:
        try:
            write_images(dataset, run)
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    writer = threading.Thread(target=write, name="selma-image-writer", daemon=True)
    before = _rows_written(run)
    writer.start()
    with progress.counter("images", total=total, unit="images drawn") as drawn:
        while writer.is_alive():
            writer.join(progress.poll_s)
            drawn.update(_rows_written(run) - before)
    if failure:
        raise failure[0]


def image_dataset(rows: pa.Table, model: str, settings: ImagesConfig, *, batch_size: int,
                  resources: Resources, min_actors: int = 1):
    """The Ray Data pipeline that draws ``rows`` on a pool of ``min_actors`` to ``resources.workers``
    generator actors."""
    return draw_images(ray.data.from_arrow(batched_blocks(rows, batch_size)), model, settings, batch_size=batch_size,
                       resources=resources, min_actors=min_actors)


def draw_images(planned, model: str, settings: ImagesConfig, *, batch_size: int, resources: Resources,
                min_actors: int = 1, lora: str | None = None, vae: str | None = None):
    """``planned`` (a dataset of planned image rows) drawn on a pool of ``min_actors`` to
    ``resources.workers`` generator actors, with the LoRA in folder ``lora`` fused into the model
    and the VAE ``vae`` in place of its own when given."""
    return planned.map_batches(
        GenerateImages,
        fn_constructor_args=(model, settings, resources.cpu_threads, lora, vae),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=resources.workers),
        batch_format="numpy",
        **resources.ray_options(),
    )


def write_images(dataset, run: RunDir, images_dir: str = "images", errors_dir: str = "errors/images") -> None:
    """Stream ``dataset`` into ``run``'s ``images_dir/<skill>/`` and ``errors_dir``, block by block."""
    # Writing is I/O: with a CPU per write task it would starve once the actors hold every CPU.
    dataset.write_datasink(_image_sink(run.uri, images_dir, errors_dir), ray_remote_args={"num_cpus": 0})


def batched_blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """One block per batch, built in the driver: a repartition would need CPU tasks, and the
    generator actors may hold every CPU."""
    return [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)] or [table]


def _rows_written(run: RunDir) -> int:
    return sum(run.parquet_rows(f) for f in run.list_files("images"))


def count_per_skill(table: pa.Table | None) -> dict[str, int]:
    if table is None:
        return {}
    counts = table.group_by("skill").aggregate([("skill", "count")])
    return dict(zip(counts.column("skill").to_pylist(), counts.column("skill_count").to_pylist()))
