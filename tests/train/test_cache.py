"""The latent cache without Ray: cached rows decode to what the uncached path computes, a loss from a
cached batch equals the uncached loss, the key follows the model, and a refill skips cached images."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from image_helpers import patterned_png

from selma.config import load_config
from selma.core.config import TrainConfig
from selma.core.rundir import RunDir
from selma.train.cache import (
    CacheSpec,
    EncodeForCache,
    _drop_other_generations,
    _drop_repeated_rows,
    cached_image_ids,
    decode_cached,
    read_cached,
    read_uncached,
    uncached_images,
)
from selma.train.data import PrepareTrainingBatch
from selma.train.step import diffusion_loss, encode_text, load_training_components, uses_autocast

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def _rows(count: int = 4, skill: str = "coco", first: int = 0) -> dict:
    return {"image_id": np.array([f"img-{skill}-{first + i}" for i in range(count)], dtype=object),
            "skill": np.array([skill] * count, dtype=object),
            "image": np.array([patterned_png(COLORS[(first + i) % 4], first + i, slice(4, 20)) for i in range(count)], dtype=object),
            "prompt": np.array([f"a square number {first + i}" for i in range(count)], dtype=object)}


def _spec(model: str = "tiny:sd", mixed_precision: str = "no", autocast: bool = False, **fields) -> CacheSpec:
    return CacheSpec(**{"model": model, "resolution": 64, "mixed_precision": mixed_precision, "autocast": autocast,
                        "images": "hash@1", **fields})


def _train(mixed_precision: str = "no") -> TrainConfig:
    return TrainConfig(rank=4, alpha=4, batch_size=2, effective_batch_size=2, strategy="ddp",
                       mixed_precision=mixed_precision)


class _AlwaysFlip:
    """The preparer's random source, drawing a flip every time (random_crop is off)."""

    def random(self) -> float:
        return 0.0


def _uncached(model: str, rows: dict, flip: bool) -> dict[str, torch.Tensor]:
    """What the uncached path prepares for ``rows``: centre crop, every image flipped or none."""
    prepare = PrepareTrainingBatch(model, 64, random_crop=False, random_flip=flip)
    prepare.rng = _AlwaysFlip()
    prepared, skipped = prepare(rows)
    assert not skipped
    return {key: torch.from_numpy(value) for key, value in prepared.items()}


def _mixed(plain: dict, flipped: dict, flips: np.ndarray) -> dict:
    choose = torch.from_numpy(flips)[:, None, None, None]
    return {**plain, "pixel_values": torch.where(choose, flipped["pixel_values"], plain["pixel_values"])}


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_cached_rows_decode_to_the_uncached_latent_distribution_and_hidden_states(mixed_precision):
    train = _train(mixed_precision)
    rows = _rows()
    cached = pa.table(EncodeForCache(_spec(mixed_precision=mixed_precision, autocast=uses_autocast(train)), "cpu")(rows))
    assert cached.column("error").null_count == 4
    flips = np.array([True, False, False, True])
    decoded = decode_cached(cached, flips)

    components = load_training_components("tiny:sd", train)
    autocast = torch.autocast("cpu", dtype=components.weight_dtype, enabled=uses_autocast(train))
    plain, flipped = _uncached("tiny:sd", rows, False), _uncached("tiny:sd", rows, True)
    batch = _mixed(plain, flipped, flips)
    with torch.no_grad(), autocast:
        moments = components.vae.encode(batch["pixel_values"].to(components.weight_dtype)).latent_dist.parameters
        hidden, _ = encode_text(components, batch)
    assert moments.dtype == components.weight_dtype
    assert torch.equal(torch.from_numpy(decoded["latent_moments"]), moments.float())
    assert torch.equal(torch.from_numpy(decoded["encoder_hidden_states"]), hidden.float())
    assert set(decoded) == {"latent_moments", "encoder_hidden_states"}
    # the flipped variant is the mirror image's, not the same latents again
    assert not torch.equal(torch.from_numpy(decode_cached(cached, ~flips)["latent_moments"]), moments.float())


@pytest.mark.parametrize("model", ["tiny:sd", "tiny:sdxl"])
def test_a_loss_from_a_cached_batch_equals_the_uncached_loss_for_the_same_generator(model):
    train = _train()
    rows = _rows()
    encoder = EncodeForCache(_spec(model), "cpu")
    cached = pa.table(encoder(rows))
    torch.manual_seed(0)
    components = load_training_components(model, train)
    for flips in (np.array([True, False, True, False]), np.zeros(4, bool)):
        uncached = _mixed(_uncached(model, rows, False), _uncached(model, rows, True), flips)
        from_cache = {key: torch.from_numpy(value) for key, value in decode_cached(cached, flips).items()}
        if model == "tiny:sdxl":
            assert set(from_cache) == {"latent_moments", "encoder_hidden_states", "text_embeds", "add_time_ids"}
            assert torch.equal(from_cache["add_time_ids"], uncached["add_time_ids"])
        with torch.no_grad():
            expected = diffusion_loss(components, uncached, torch.Generator().manual_seed(7))
            loss = diffusion_loss(components, from_cache, torch.Generator().manual_seed(7))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=0)


def test_an_undecodable_image_is_cached_as_its_error_and_reported_once_per_pass(tmp_path):
    rows = _rows()
    rows["image"][1] = rows["image"][1][:50]
    cached = pa.table(EncodeForCache(_spec(), "cpu")(rows))
    assert cached.column("error").to_pylist()[1].startswith("undecodable image:")
    assert cached.column("latent_moments")[1].as_py() is None and cached.column("latent_moments")[0].as_py()
    run = RunDir(str(tmp_path / "run"))
    run.write_table("cache/k/coco/part-a.parquet", cached)
    reported: list = []
    batches = list(read_cached({"path": np.array(run.list_files("cache", "k", "coco"))}, run_uri=run.uri,
                               rows_per_batch=2, report_skipped=reported.extend))
    assert [len(b["latent_moments"]) for b in batches] == [2, 1]
    assert [(r["image_id"], r["problem"][:18]) for r in reported] == [("img-coco-1", "undecodable image:")]


def test_the_key_changes_with_whatever_changes_the_encoding_and_nothing_is_reused(tmp_path):
    base = _spec()
    assert _spec().key == base.key
    changed = [_spec(model="tiny:sdxl"), _spec(resolution=128), _spec(mixed_precision="bf16"), _spec(autocast=True),
               _spec(images="hash@2"), _spec(vae='"my-vae"')]
    assert len({base.key, *(spec.key for spec in changed)}) == len(changed) + 1

    run = RunDir(str(tmp_path / "run"))
    run.update_stage("images", config_hash="abc", started_at=5.0)
    config = load_config("tiny", ["train.cache_latents=true", f"run_dir={run.uri}"])
    spec = CacheSpec.for_run(config, run, 64)
    assert (spec.model, spec.images, spec.resolution) == ("tiny:sd", "abc@5.0", 64)
    assert (spec.mixed_precision, spec.autocast) == (config.train.mixed_precision, uses_autocast(config.train))
    bf16 = load_config("tiny", ["train.mixed_precision=bf16", "train.strategy=ddp"])
    assert CacheSpec.for_run(bf16, run, 64).key != spec.key and CacheSpec.for_run(bf16, run, 64).autocast
    assert CacheSpec.for_run(load_config("tiny", ["model=tiny:sdxl"]), run, 64).key != spec.key
    assert CacheSpec.for_run(config, run, 128).key != spec.key

    _write_images(run, "coco", 4)
    run.write_table(f"{spec.folder}/coco/part-a.parquet", pa.table(EncodeForCache(spec, "cpu")(_rows(4))))
    assert cached_image_ids(run, spec) == {f"img-coco-{i}" for i in range(4)}
    other = CacheSpec.for_run(config, run, 128)
    assert cached_image_ids(run, other) == set()
    assert sum(len(item["todo"]) for item in uncached_images(run, ["coco"], cached_image_ids(run, other))) == 4


def _write_images(run: RunDir, skill: str, count: int, first: int = 0) -> None:
    rows = _rows(count, skill, first)
    run.write_table(f"images/{skill}/part-{first}.parquet", pa.table({k: list(v) for k, v in rows.items()}))


def test_a_refill_encodes_only_the_images_not_yet_cached_and_repeats_are_dropped(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    _write_images(run, "coco", 4)
    _write_images(run, "whoops", 2)
    spec = _spec()
    encoder = EncodeForCache(spec, "cpu")
    first = {k: v[:2] for k, v in _rows(4).items()}  # a pass that stopped after one block
    run.write_table(f"{spec.folder}/coco/part-1.parquet", pa.table(encoder(first)))

    plan = uncached_images(run, ["coco", "whoops"], cached_image_ids(run, spec))
    assert [item["todo"] for item in plan] == [["img-coco-2", "img-coco-3"], ["img-whoops-0", "img-whoops-1"]]
    items = {"path": np.array([item["path"] for item in plan]), "todo": np.array([item["todo"] for item in plan])}
    read = list(read_uncached(items, run_uri=run.uri))
    assert [t.column("image_id").to_pylist() for t in read] == [["img-coco-2", "img-coco-3"],
                                                                 ["img-whoops-0", "img-whoops-1"]]
    assert set(read[0].column_names) == {"image_id", "skill", "image", "prompt"}
    for table in read:
        run.write_table(f"{spec.folder}/{table.column('skill')[0].as_py()}/part-2.parquet",
                        pa.table(encoder(table.to_pydict())))
    assert uncached_images(run, ["coco", "whoops"], cached_image_ids(run, spec)) == []

    # a write task retried after writing its block: the same rows twice
    run.write_table(f"{spec.folder}/coco/part-3.parquet", pa.table(encoder(first)))
    _drop_repeated_rows(run, spec)
    ids = run.read_table(*spec.folder.split("/"), columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6


def test_caches_of_an_earlier_generation_of_images_are_deleted_others_kept(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    current, other_model, stale = _spec(), _spec(model="tiny:sdxl"), _spec(images="hash@0")
    for spec in (current, other_model, stale):
        run.write_json(f"{spec.folder}/cache.json", {**json.loads(json.dumps(spec.__dict__))})
    _drop_other_generations(run, current)
    assert run.list_dirs("cache") == sorted([current.key, other_model.key])
