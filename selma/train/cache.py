"""Cached latents and text embeddings (``train.cache_latents``): every training image is encoded once
through the frozen VAE and text encoder(s), stored beside the run's images, and trained from.

::

    RUN/cache/<key>/cache.json               what the key stands for
    RUN/cache/<key>/<skill>/part-*.parquet   image_id, skill, error, layout, one binary column per tensor

``<key>`` hashes everything that changes the encoding: the model (and a separate VAE), the
resolution, the crop (the centre crop), the precision the train step computes in (dtype and
autocast) and the images stage's generation (its config hash and start), so regenerated images never
meet an old cache. Every expert and joint mode read the same cache, and ``--restart train`` keeps it
(the train stage does not list it in ``writes``); caches of an earlier generation of images are
deleted when a new one is filled.

Tensors are stored as the encoders produced them, raw bytes in their own dtype (``layout`` gives
each one's dtype and shape): ``latent_moments`` and ``latent_moments_flipped``, the VAE's latent
distribution (mean and log-variance on the channel axis) of the image and of its mirror image,
sampled at every step as the uncached path samples ``vae.encode(...).latent_dist``;
``encoder_hidden_states``; for SDXL ``text_embeds`` and ``add_time_ids``. A row whose image cannot be
decoded holds its ``error`` instead and is skipped (and reported) in training.

:class:`EncodeForCache` is the Ray-free core (image rows in, cache rows out), :func:`decode_cached`
turns stored rows back into a training batch; :func:`fill_latent_cache` is the Ray Data pass that
encodes the images not yet cached, so a pass that crashed resumes without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selma.core.models import resolve_model
from selma.core.progress import Progress
from selma.core.rundir import RunDir, new_part_name
from selma.core.vae import load_vae
from selma.train.data import PrepareTrainingBatch
from selma.train.step import TrainingComponents, encode_text, uses_autocast, weight_dtype_for

# torch, diffusers and ray are imported where used: the pipeline imports every stage module, and
# the vLLM venv that runs the prompt stage has no diffusers.

if TYPE_CHECKING:
    from selma.core.config import Resources

CACHE_DIR = "cache"
CACHE_FORMAT = 1
LATENTS, LATENTS_FLIPPED = "latent_moments", "latent_moments_flipped"
TENSORS = (LATENTS, LATENTS_FLIPPED, "encoder_hidden_states")
SDXL_TENSORS = ("text_embeds", "add_time_ids")
# How each dtype is held in numpy: bfloat16 as its raw 16 bits.
_STORED_AS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


@dataclass(frozen=True)
class CacheSpec:
    """What the cached tensors depend on; :attr:`key` names the cache."""

    model: str
    resolution: int
    mixed_precision: str  # the dtype the frozen encoders run in
    autocast: bool  # whether the train step runs them under torch autocast
    images: str  # the images stage's generation: config hash and start time
    vae: str | None = None
    crop: str = "center"
    format: int = CACHE_FORMAT

    @classmethod
    def for_run(cls, config, run: RunDir, resolution: int) -> "CacheSpec":
        images = run.stage("images")
        return cls(model=config.model, resolution=resolution, mixed_precision=config.train.mixed_precision,
                   autocast=uses_autocast(config.train), images=f"{images.get('config_hash')}@{images.get('started_at')}",
                   vae=config.vae)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def folder(self) -> str:
        """The cache's folder in the run directory."""
        return f"{CACHE_DIR}/{self.key}"


def load_frozen_encoders(spec: CacheSpec, device: str = "cpu") -> TrainingComponents:
    """The VAE and text encoder(s) as ``load_training_components`` sets them up (no UNet)."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(resolve_model(spec.model), unet=None, torch_dtype=torch.float32)
    vae = load_vae(spec.vae, torch.float32) if spec.vae else pipe.vae
    text_encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    dtype = weight_dtype_for(spec.mixed_precision)
    for module in [vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
        module.to(device, dtype=dtype)
    return TrainingComponents(None, vae, text_encoders, None, hasattr(pipe, "text_encoder_2"), device, dtype)


class EncodeForCache:
    """Image rows (``image_id``, ``skill``, ``image``, ``prompt``) in, cache rows out; loads the
    encoders once. Images are prepared as the uncached path prepares them (``PrepareTrainingBatch``,
    centre crop, then the mirror image for the flipped variant) and encoded under the train step's
    precision and autocast."""

    def __init__(self, spec: CacheSpec, device: str | None = None, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prepare = PrepareTrainingBatch(spec.model, spec.resolution, random_crop=False, random_flip=False)
        self.components = load_frozen_encoders(spec, device)
        self.autocast = torch.autocast(torch.device(device).type, dtype=self.components.weight_dtype,
                                       enabled=spec.autocast)
        self.tensor_names = TENSORS + (SDXL_TENSORS if self.components.is_sdxl else ())

    def encode(self, prepared: dict[str, np.ndarray]) -> dict:
        """The cached tensors of a prepared batch (torch, as the encoders produce them)."""
        import torch

        c = self.components
        batch = {key: torch.from_numpy(value).to(c.device) for key, value in prepared.items()}
        with torch.no_grad(), self.autocast:
            pixels = batch["pixel_values"].to(c.device, c.weight_dtype)
            tensors = {LATENTS: c.vae.encode(pixels).latent_dist.parameters,
                       LATENTS_FLIPPED: c.vae.encode(torch.flip(pixels, dims=[-1])).latent_dist.parameters}
            hidden, added = encode_text(c, batch)
        tensors["encoder_hidden_states"] = hidden
        if c.is_sdxl:
            tensors["text_embeds"], tensors["add_time_ids"] = added["text_embeds"], batch["add_time_ids"]
        return tensors

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        prepared, skipped = self.prepare(batch)
        problems = {row["image_id"]: row["problem"] for row in skipped}
        usable = len(problems) < len(ids)
        stored: dict[str, list] = {name: [None] * len(ids) for name in self.tensor_names}
        layouts: list = [None] * len(ids)
        if usable:
            positions = [n for n, i in enumerate(ids) if i not in problems]
            layout = {}
            for name, tensor in self.encode(prepared).items():
                rows, layout[name] = tensor_rows(tensor)
                for position, row in zip(positions, rows):
                    stored[name][position] = row
            for position in positions:
                layouts[position] = json.dumps(layout)
        return {"image_id": np.array(ids, dtype=object), "skill": np.array([str(s) for s in batch["skill"]], dtype=object),
                "error": np.array([problems.get(i) for i in ids], dtype=object),
                "layout": np.array(layouts, dtype=object),
                **{name: np.array(values, dtype=object) for name, values in stored.items()}}


def tensor_rows(tensor) -> tuple[list[bytes], dict]:
    """One tensor's rows as raw bytes in its own dtype, and its layout (dtype, shape of a row)."""
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _STORED_AS:
        raise TypeError(f"cannot cache a {dtype} tensor; expected one of {sorted(_STORED_AS)}")
    tensor = tensor.detach().to("cpu").contiguous()
    array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return [row.tobytes() for row in array], {"dtype": dtype, "shape": list(array.shape[1:])}


def tensor_from_rows(rows: list[bytes], layout: dict) -> np.ndarray:
    """``rows`` stacked as float32 (exact for every cached dtype)."""
    raw = np.frombuffer(b"".join(rows), dtype=_STORED_AS[layout["dtype"]])
    if layout["dtype"] == "bfloat16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False).reshape(len(rows), *layout["shape"])


def decode_cached(rows: pa.Table, flips: np.ndarray) -> dict[str, np.ndarray]:
    """A training batch from usable cached rows: ``latent_moments`` (of the mirror image where
    ``flips``), ``encoder_hidden_states`` and, for SDXL, ``text_embeds`` and ``add_time_ids``."""
    layout = json.loads(rows.column("layout")[0].as_py())
    plain, flipped = rows.column(LATENTS).to_pylist(), rows.column(LATENTS_FLIPPED).to_pylist()
    batch = {LATENTS: tensor_from_rows([f if flip else p for p, f, flip in zip(plain, flipped, flips)], layout[LATENTS])}
    for name in layout:
        if name not in (LATENTS, LATENTS_FLIPPED):
            batch[name] = tensor_from_rows(rows.column(name).to_pylist(), layout[name])
    return batch


def usable_rows(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """The rows holding tensors, and the others as skipped rows (``skill``, ``image_id``, ``problem``)."""
    failed = pc.is_valid(table.column("error"))
    skipped = [{"skill": row["skill"], "image_id": row["image_id"], "problem": row["error"]}
               for row in table.filter(failed).select(["skill", "image_id", "error"]).to_pylist()]
    return table.filter(pc.invert(failed)), skipped


def read_cached(items: dict[str, np.ndarray], *, run_uri: str, rows_per_batch: int, random_flip: bool = True,
                report_skipped=None):
    """``map_batches`` generator over an epoch plan of cache files (see ``selma.train.data``): their
    usable rows as training batches of ``rows_per_batch``, each sample's flip drawn anew every epoch.
    Rows recorded as undecodable go to ``report_skipped(rows)``."""
    import pyarrow.parquet as pq

    filesystem = RunDir(run_uri).fs
    rng = np.random.default_rng()
    pending: list[pa.Table] = []

    def flush():
        table = pa.concat_tables(pending)
        pending.clear()
        return decode_cached(table, rng.random(table.num_rows) < 0.5 if random_flip else np.zeros(table.num_rows, bool))

    for path in items["path"]:
        with filesystem.open_input_file(str(path)) as handle:
            table, skipped = usable_rows(pq.read_table(handle))
        if skipped and report_skipped is not None:
            report_skipped(skipped)
        for start in range(0, table.num_rows, rows_per_batch):
            pending.append(table.slice(start, rows_per_batch))
            if sum(t.num_rows for t in pending) >= rows_per_batch:
                yield flush()
    if pending and sum(t.num_rows for t in pending):
        yield flush()


def cached_rows_per_block(run: RunDir, files: list[str], batch_size: int, target_bytes: int = 32 << 20) -> int:
    """Rows per training block: about ``target_bytes`` of float32 tensors, and at least one micro-batch."""
    for path in files:
        table, _ = usable_rows(run.read_parquet(path, ["layout", "error", "skill", "image_id"]))
        if table.num_rows:
            layout = json.loads(table.column("layout")[0].as_py())
            row_bytes = sum(4 * int(np.prod(t["shape"])) for name, t in layout.items() if name != LATENTS_FLIPPED)
            return max(batch_size, target_bytes // max(row_bytes, 1))
    return batch_size


# ---- the Ray Data pass ----------------------------------------------------------------------------

def cached_image_ids(run: RunDir, spec: CacheSpec) -> set[str]:
    """The image_ids the cache holds (encoded, or recorded as undecodable)."""
    table = run.read_table(*spec.folder.split("/"), columns=["image_id"])
    return set() if table is None else set(table.column("image_id").to_pylist())


def uncached_images(run: RunDir, skills: list[str], done: set[str]) -> list[dict]:
    """``{"path", "todo"}`` per image file with rows not in ``done``: the file and those rows' ids."""
    plan = []
    for skill in skills:
        for path in run.list_files("images", skill):
            todo = [i for i in run.read_parquet(path, ["image_id"]).column("image_id").to_pylist() if i not in done]
            if todo:
                plan.append({"path": path, "todo": todo})
    return plan


def read_uncached(items: dict[str, np.ndarray], *, run_uri: str):
    """``map_batches`` generator: the image rows each planned file has still to encode."""
    import pyarrow.parquet as pq

    filesystem = RunDir(run_uri).fs
    for path, todo in zip(items["path"], items["todo"]):
        with filesystem.open_input_file(str(path)) as handle:
            table = pq.read_table(handle, columns=["image_id", "skill", "image", "prompt"])
        yield table.filter(pc.is_in(table.column("image_id"), pa.array(list(todo), pa.string())))


def _cache_sink(run_uri: str, folder: str):
    from ray.data import Datasink

    class CacheParquetSink(Datasink):
        """Writes each block's rows per skill as one atomic Parquet file."""

        def __init__(self, uri: str, folder: str):
            self.uri, self.folder = uri, folder

        def write(self, blocks, ctx) -> int:
            run = RunDir(self.uri)
            written = 0
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
                if not table.num_rows:
                    continue
                table = pa.table({name: table.column(name).cast(pa.string() if name in ("image_id", "skill", "error", "layout")
                                                                 else pa.binary()) for name in table.column_names})
                for skill in pc.unique(table.column("skill")).to_pylist():
                    part = table.filter(pc.equal(table.column("skill"), skill))
                    run.write_table(f"{self.folder}/{skill}/{new_part_name()}", part)
                    written += part.num_rows
            return written

    return CacheParquetSink(run_uri, folder)


def fill_latent_cache(run: RunDir, spec: CacheSpec, skills: list[str], *, resources: Resources, actors: int,
                      batch_size: int, progress=None) -> dict:
    """Encode every image of ``skills`` not yet in the cache on up to ``actors`` Ray Data actors with
    ``resources`` each; returns what the cache holds and what this pass did."""
    import ray

    progress = Progress.of(progress)
    _drop_other_generations(run, spec)
    if not run.exists(spec.folder, "cache.json"):
        run.write_json(f"{spec.folder}/cache.json", asdict(spec))
    done = cached_image_ids(run, spec)
    plan = uncached_images(run, skills, done)
    total = sum(len(item["todo"]) for item in plan)
    each = ", ".join(f"{amount:g} {name}" for name, amount in resources.per_worker().items())
    progress(f"[train] latent cache {run.uri_of(spec.folder)}: {len(done)} images cached already, {total} to encode"
             + (f" on up to {actors} encoder actors × ({each})" if total else ""))
    started = time.time()
    if total:
        dataset = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
            read_uncached, fn_kwargs={"run_uri": run.uri}, batch_size=1, batch_format="numpy",
            num_cpus=0,  # reading is I/O; decoding happens in the encoders
        ).map_batches(
            EncodeForCache,
            fn_constructor_args=(spec, "cuda" if resources.gpus else "cpu", resources.cpu_threads),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
            batch_format="numpy",
            **resources.ray_options(),
        )
        _write_with_progress(dataset, run, spec.folder, total, progress)
    _drop_repeated_rows(run, spec)
    table = run.read_table(*spec.folder.split("/"), columns=["image_id", "error"])
    unusable = 0 if table is None else table.num_rows - pc.sum(pc.is_null(table.column("error"))).as_py()
    cached = 0 if table is None else table.num_rows
    seconds = round(time.time() - started, 3)
    if total:
        progress(f"[train] latent cache: encoded {cached - len(done)} images in {seconds:.1f}s"
                 + (f" ({unusable} undecodable)" if unusable else ""))
    return {"key": spec.key, "images": cached, "encoded": cached - len(done), "unusable": unusable, "seconds": seconds}


def _write_with_progress(dataset, run: RunDir, folder: str, total: int, progress: Progress) -> None:
    """Write ``dataset`` into ``folder`` in a thread; count the rows written as they land."""
    failure: list[BaseException] = []

    def write() -> None:
        try:
            dataset.write_datasink(_cache_sink(run.uri, folder), ray_remote_args={"num_cpus": 0})
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    def rows() -> int:
        return sum(run.parquet_rows(f) for f in run.list_files(*folder.split("/")))

    before = rows()
    writer = threading.Thread(target=write, name="selma-cache-writer", daemon=True)
    writer.start()
    with progress.counter("train cache", total=total, unit="images encoded") as encoded:
        while writer.is_alive():
            writer.join(progress.poll_s)
            encoded.update(rows() - before)
    if failure:
        raise failure[0]


def _drop_repeated_rows(run: RunDir, spec: CacheSpec) -> None:
    """Rewrite any part file holding image_ids an earlier file holds (a retried write task can
    write a block twice), so every image is trained on once."""
    seen: set[str] = set()
    for path in run.list_files(*spec.folder.split("/")):
        ids = run.read_parquet(path, ["image_id"]).column("image_id").to_pylist()
        repeated = seen.intersection(ids)
        if repeated:
            table = run.read_parquet(path)
            table = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(sorted(repeated)))))
            relative = path[len(run.root) + 1:]
            if table.num_rows:
                run.write_table(relative, table)
            else:
                run.delete_quietly(path)
        seen.update(ids)


def _drop_other_generations(run: RunDir, spec: CacheSpec) -> None:
    """Delete caches made from an earlier generation of the run's images: nothing can read them again."""
    for key in run.list_dirs(CACHE_DIR):
        if key == spec.key or not run.exists(CACHE_DIR, key, "cache.json"):
            continue
        if run.read_json(f"{CACHE_DIR}/{key}/cache.json").get("images") != spec.images:
            run.delete_quietly(run.path(CACHE_DIR, key))
