"""Validation images while an expert trains: a few of its skill's prompts, drawn with fixed seeds by
the LoRA being trained, into ``experts/<name>/validation/step-<N>/`` (``<i>.png`` and ``prompts.json``).

The pipeline is assembled from the training components (the UNet with its LoRA active, the frozen
VAE and text encoders), so nothing is loaded twice. Drawing never touches the training state: the
images have their own generators, the global RNG is restored afterwards, gradients are off and the
UNet goes back to train mode.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selma.core.ids import derived_seed
from selma.core.models import resolve_model
from selma.core.rundir import RunDir
from selma.images.generator import _has_component

# torch and diffusers are imported where used, as in the rest of selma.train.


@dataclass(frozen=True)
class ValidationPlan:
    """What an expert's validation images are: prompts, seeds and sampling settings, fixed for the run."""

    every: int
    prompt_ids: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    resolution: int
    negative_prompt: str | None = None

    def describe(self) -> list[dict]:
        return [{"index": i, "prompt_id": pid, "prompt": prompt, "seed": seed}
                for i, (pid, prompt, seed) in enumerate(zip(self.prompt_ids, self.prompts, self.seeds))]


def validation_plan(config, skills: tuple[str, ...], run: RunDir, resolution: int) -> ValidationPlan | None:
    """The plan of an expert training on ``skills``, or None when ``train.validate_every`` is off.

    Prompts: each skill's prompts by ``prompt_id``, taken in turn across the skills (one skill: its
    first ``train.validation_prompts``)."""
    t = config.train
    if not t.validate_every:
        return None
    per_skill = []
    for skill in skills:
        table = run.read_table("prompts", skill, columns=["prompt_id", "prompt"])
        rows = sorted(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist())) if table else []
        per_skill.append(list(dict(rows).items()))
    chosen = [rows[i] for i in range(max(map(len, per_skill), default=0)) for rows in per_skill if i < len(rows)]
    chosen = chosen[: t.validation_prompts]
    if not chosen:
        raise RuntimeError(f"train.validate_every: no prompts of {list(skills)} in {run.uri}/prompts to draw")
    return ValidationPlan(
        every=t.validate_every, prompt_ids=tuple(p for p, _ in chosen), prompts=tuple(text for _, text in chosen),
        seeds=tuple(derived_seed(t.seed, "validation", p) for p, _ in chosen),
        steps=t.validation_steps or config.images.steps, guidance_scale=config.images.guidance_scale,
        resolution=resolution, negative_prompt=config.images.negative_prompt)


class Validator:
    """Draws an expert's validation images when due and writes them into the run directory."""

    def __init__(self, plan: ValidationPlan, *, model: str, run_uri: str, expert: str, max_steps: int,
                 mixed_precision: str = "no"):
        self.plan = plan
        self.model = model
        self.rundir = RunDir(run_uri)
        self.expert = expert
        self.max_steps = max_steps
        self.mixed_precision = mixed_precision
        self._pipe = None

    def due(self, step: int) -> bool:
        return step % self.plan.every == 0 or step == self.max_steps

    def clear(self) -> None:
        """Remove the images of an earlier attempt at this expert (a run that starts from step 0)."""
        self.rundir.delete_quietly(self.rundir.path("experts", self.expert, "validation"))

    def pipeline(self, components):
        if self._pipe is None:
            from diffusers import DiffusionPipeline

            path = resolve_model(self.model)
            modules = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoders[0]}
            if len(components.text_encoders) > 1:
                modules["text_encoder_2"] = components.text_encoders[1]
            if _has_component(path, "safety_checker"):
                modules.update(safety_checker=None, requires_safety_checker=False)
            self._pipe = DiffusionPipeline.from_pretrained(path, **modules)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def draw(self, components) -> list:
        """The plan's images (PIL), one at a time, with the LoRA as it stands."""
        import torch

        pipe = self.pipeline(components)
        device = torch.device(components.device)
        unet = components.unet
        was_training = unet.training
        autocast = torch.autocast(device.type, dtype=components.weight_dtype, enabled=self.mixed_precision != "no")
        images = []
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.no_grad(), autocast:
            unet.eval()
            try:
                for prompt, seed in zip(self.plan.prompts, self.plan.seeds):
                    images += pipe(prompt=prompt, negative_prompt=self.plan.negative_prompt,
                                   num_inference_steps=self.plan.steps, guidance_scale=self.plan.guidance_scale,
                                   height=self.plan.resolution, width=self.plan.resolution,
                                   generator=torch.Generator(device=device).manual_seed(seed)).images
            finally:
                unet.train(was_training)
        return images

    def run(self, components, step: int) -> tuple[list, list[str]]:
        """Draw, write ``experts/<expert>/validation/step-<step>/``; returns the images and their prompts."""
        images = self.draw(components)
        with tempfile.TemporaryDirectory(prefix="selma-validation-") as directory:
            directory = Path(directory)
            for index, image in enumerate(images):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                (directory / f"{index}.png").write_bytes(buffer.getvalue())
            settings = {"step": step, "steps": self.plan.steps, "guidance_scale": self.plan.guidance_scale,
                        "resolution": self.plan.resolution, "negative_prompt": self.plan.negative_prompt,
                        "images": self.plan.describe()}
            (directory / "prompts.json").write_text(json.dumps(settings, indent=2))
            self.rundir.put_dir(directory, f"experts/{self.expert}/validation/step-{step:06d}")
        return images, list(self.plan.prompts)
