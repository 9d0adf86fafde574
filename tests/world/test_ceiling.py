"""``selma world ceiling``: full fine-tuning on ground-truth renders, scored with the exact evaluator."""

import subprocess
import sys

import numpy as np

from selma.world import caption_of, sample_scenes
from selma.world.ceiling import CeilingConfig, finetune_ceiling, score_prompts
from selma.world.render import render

TINY = dict(steps=2, score_every=1, batch_size=4, scenes=8, prompts=3, image_seeds=1, sampling_steps=2, threads=1)


class RenderingPipeline:
    """A "model" that draws each caption's scene exactly (or a blank canvas): what the evaluator must score 1 (0)."""

    def __init__(self, scenes, blank=False):
        self.scenes = {caption_of(scene): scene for scene in scenes}
        self.blank = blank
        self.calls = 0

    def __call__(self, prompts, generator, **_):
        assert len(generator) == len(prompts)
        self.calls += 1
        images = [np.ones((64, 64, 3)) if self.blank else render(self.scenes[p]) / 255.0 for p in prompts]
        return type("Output", (), {"images": np.stack(images)})


def test_score_prompts_is_the_exact_evaluators_prompt_accuracy_over_every_image_seed():
    scenes = sample_scenes("counting", 60, seed=7, split="test")
    prompts = [caption_of(scene) for scene in scenes]
    config = CeilingConfig(prompts=60, image_seeds=2)
    perfect = RenderingPipeline(scenes)
    assert score_prompts(perfect, prompts, config) == {"accuracy": 1.0, "stderr": 0.0}
    assert perfect.calls == 4  # two image seeds × batches of 50
    assert score_prompts(RenderingPipeline(scenes, blank=True), prompts, config)["accuracy"] == 0.0


def test_a_ceiling_run_scores_the_loaded_model_first_then_after_each_scoring_interval():
    import torch
    from diffusers import DiffusionPipeline

    from selma.core.models import resolve_model

    config = CeilingConfig(kind="binding", **TINY)
    rows = finetune_ceiling(config, progress=lambda _: None)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[0]["loss"] is None and all(np.isfinite(row["loss"]) for row in rows[1:])
    pipe = DiffusionPipeline.from_pretrained(resolve_model("world:base"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    held_out = [caption_of(scene) for scene in sample_scenes("binding", 3, seed=7, split="test")]
    assert score_prompts(pipe, held_out, config) == {
        k: rows[0][k] for k in ("accuracy", "stderr")}


def test_ceiling_cli_names_a_bad_field():
    result = subprocess.run([sys.executable, "-m", "selma", "world", "ceiling", "kind=shapes", "steps=0"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "kind: Value error, 'shapes' is not a world kind" in result.stderr
    assert "steps: Input should be greater than or equal to 1" in result.stderr


def test_ceiling_cli_refuses_a_json_file_it_could_not_write_before_training(tmp_path):
    result = subprocess.run([sys.executable, "-m", "selma", "world", "ceiling", "--json",
                             str(tmp_path / "missing" / "rows.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"--json: cannot write {tmp_path / 'missing' / 'rows.json'}" in result.stderr
    assert "[ceiling]" not in result.stdout  # nothing was trained or scored
