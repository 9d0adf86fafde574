"""`selma run --config tiny` for real, through the CLI, then every artifact checked."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

# Three of the five built-in skills (the demo, `make demo`, runs all five): enough to test merging
# several experts and serving them side by side, at two fewer Ray Train start-ups.
SKILLS = ["coco", "countbench", "whoops"]
OVERRIDES = [f"skills.names=[{', '.join(SKILLS)}]", "prompts.per_skill=4", "train.max_steps=4",
             "train.checkpoint_every=2", "images.steps=4"]

pytestmark = pytest.mark.slow


def _selma(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selma", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    result = _selma("run", "--config", "tiny", "--run-dir", str(run_dir), *OVERRIDES)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir, result.stdout


def _read(run_dir: Path, stage: str, skill: str):
    files = sorted((run_dir / stage / skill).glob("*.parquet"))
    return pq.ParquetDataset(files).read().to_pylist()


def test_summary_and_manifest(finished_run):
    run_dir, stdout = finished_run
    assert "merged adapter:" in stdout
    for skill in SKILLS:
        assert skill in stdout
    manifest = json.loads((run_dir / "run.json").read_text())
    assert {name: s["status"] for name, s in manifest["stages"].items()} == {
        "prompts": "committed", "images": "committed", "train": "committed", "merge": "committed"}
    assert manifest["config"]["prompts"]["per_skill"] == 4


def test_prompts_per_skill(finished_run):
    run_dir, _ = finished_run
    for skill in SKILLS:
        rows = _read(run_dir, "prompts", skill)
        llm = [r for r in rows if r["origin"] == "llm"]
        assert len(llm) == 4 and len({r["prompt_id"] for r in llm}) == 4
        assert len([r for r in rows if r["origin"] == "seed"]) == 3


def test_images_are_pngs_of_the_configured_size(finished_run):
    from PIL import Image

    run_dir, _ = finished_run
    for skill in SKILLS:
        rows = _read(run_dir, "images", skill)
        assert len(rows) == 4 and len({r["image_id"] for r in rows}) == 4
        for row in rows:
            image = Image.open(io.BytesIO(row["image"]["bytes"]))
            assert image.format == "PNG" and image.size == (64, 64) == (row["width"], row["height"])
            assert row["steps"] == 4 and row["model"] == "tiny:sd"


def test_experts_trained_and_load_in_plain_diffusers(finished_run):
    import torch
    from diffusers import DiffusionPipeline

    from selma.core.models import resolve_model
    from selma.merge.lora_io import read_lora

    run_dir, _ = finished_run
    pipe = DiffusionPipeline.from_pretrained(resolve_model("tiny:sd"))
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    base = draw()
    for skill in SKILLS:
        expert = run_dir / "experts" / skill
        assert (expert / "pytorch_lora_weights.safetensors").exists()
        assert (expert / "README.md").exists() and (expert / "adapter_config.json").exists()
        metrics = [json.loads(line) for line in (expert / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        adapter = read_lora(expert)
        # peft's gaussian init sets B to zero: any non-zero B means training moved the weights.
        assert any(float(layer.B.abs().max()) > 0 for layer in adapter.layers.values())
        pipe.load_lora_weights(str(expert), adapter_name=skill)
        pipe.set_adapters([skill])
        assert not np.allclose(draw(), base), f"loading expert {skill} did not change the output"
        pipe.delete_adapters(skill)


def test_merged_adapter_is_the_mean_of_the_expert_deltas(finished_run):
    import torch

    from selma.merge.lora_io import read_lora

    run_dir, _ = finished_run
    experts = [read_lora(run_dir / "experts" / s) for s in SKILLS]
    merged = read_lora(run_dir / "merged")
    assert set(merged.layers) == set(experts[0].layers)
    for name in merged.layers:
        expected = sum(e.delta(name) for e in experts) / len(experts)
        torch.testing.assert_close(merged.delta(name), expected, atol=1e-6, rtol=1e-5)
    report = json.loads((run_dir / "merged" / "merge.json").read_text())
    assert report["method"] == "delta_mean"


def test_a_second_run_redoes_nothing(finished_run):
    run_dir, _ = finished_run
    before = json.loads((run_dir / "run.json").read_text())["stages"]
    result = _selma("run", "--config", "tiny", "--run-dir", str(run_dir), *OVERRIDES, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("prompts", "images", "train", "merge"):
        assert f"[{stage}] already committed" in result.stdout
    after = json.loads((run_dir / "run.json").read_text())["stages"]
    assert after == before


def test_a_changed_config_is_refused_on_a_committed_run(finished_run):
    run_dir, _ = finished_run
    result = _selma("images", "--config", "tiny", "--run-dir", str(run_dir), *OVERRIDES, "images.steps=5",
                    timeout=300)
    assert result.returncode == 2
    assert "different config" in result.stderr


def test_serve_round_trip_returns_a_png(finished_run, selma_server):
    import httpx
    from PIL import Image

    run_dir, _ = finished_run
    url = selma_server(run_dir)
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["merged", "base", *(f"expert-{s}" for s in SKILLS)]
    for model in ("merged", "expert-whoops"):
        response = httpx.post(f"{url}/v1/images/generations",
                              json={"prompt": "two red apples on a table", "size": "64x64", "seed": 1, "model": model},
                              timeout=120)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.format == "PNG" and image.size == (64, 64)
