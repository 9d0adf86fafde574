"""Intermediate experts: each expert's LoRA at every checkpoint, as a folder plain diffusers loads.

While an expert trains, rank 0 writes its LoRA at every ``train.checkpoint_every`` steps and at the
last step to ``RUN/experts/<name>/checkpoints/step-<N:06d>/`` (:func:`write_checkpoint`; the layout
is :mod:`selma.core.expert_steps`'). ``selma experts list`` shows them (:func:`format_listing`) and
``selma experts export`` copies one step of each expert out of the run (:func:`export_experts`).
Ray Train's own checkpoints (optimizer state, RNG, for resuming) stay in ``RUN/_work/train``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selma.core.expert_steps import (
    CHECKPOINTS_DIR,
    LAST,
    STEP_FILE,
    checkpoint_relative,
    parse_select,
    step_of_folder,
)
from selma.core.rundir import RunDir, RunDirError
from selma.merge.lora_io import CONFIG_NAME, WEIGHT_NAME, atomic_write, copy_adapter_files, save_peft_state_dict
from selma.train.step import peft_lora_config


def write_checkpoint(trainer, rank: int, *, run_uri: str, expert: str, base_model: str, loss: float) -> dict:
    """Write ``expert``'s LoRA at ``trainer.step`` (a :class:`selma.train.step.LoraTrainStep`) into the
    run, replacing that step's folder if an earlier attempt wrote it. Every rank calls this: under
    ZeRO-3 gathering the LoRA is a collective; rank 0 writes. Returns the gathered LoRA."""
    state = trainer.lora_state_dict()
    if rank != 0:
        return state
    step = trainer.step
    with tempfile.TemporaryDirectory(prefix="selma-step-") as directory:
        save_peft_state_dict(state, peft_lora_config(trainer.train_config), directory, base_model=base_model,
                             extra_metadata={"skill": expert, "step": str(step)})
        Path(directory, STEP_FILE).write_text(json.dumps({"step": step, "loss": loss}) + "\n")
        RunDir(run_uri).put_dir(directory, checkpoint_relative(expert, step))
    return state


@dataclass(frozen=True)
class ExportedStep:
    step: int
    loss: float | None
    relative: str  # the run-relative LoRA folder
    final: bool = False  # the final expert (experts/<name>/ itself), not a checkpoint


def exported_steps(run: RunDir, expert: str) -> list[ExportedStep]:
    """``expert``'s checkpoints in ``run``, by step (a folder without its weights or step.json, still
    being written, is left out)."""
    found = []
    for folder in run.list_dirs("experts", expert, CHECKPOINTS_DIR):
        step = step_of_folder(folder)
        relative = f"experts/{expert}/{CHECKPOINTS_DIR}/{folder}"
        if step is None or not (run.exists(relative, WEIGHT_NAME) and run.exists(relative, STEP_FILE)):
            continue
        found.append(ExportedStep(step, run.read_json(f"{relative}/{STEP_FILE}").get("loss"), relative))
    return sorted(found, key=lambda s: s.step)


def final_expert(run: RunDir, expert: str) -> ExportedStep | None:
    """The finished expert (its last metrics.jsonl row gives step and loss), None while it trains."""
    relative = f"experts/{expert}"
    if not run.exists(relative, WEIGHT_NAME):
        return None
    last = {}
    if run.exists(relative, "metrics.jsonl"):
        rows = [line for line in run.read_bytes(f"{relative}/metrics.jsonl").decode().splitlines() if line.strip()]
        last = json.loads(rows[-1]) if rows else {}
    return ExportedStep(last.get("step", 0), last.get("loss"), relative, final=True)


def expert_names(run: RunDir) -> list[str]:
    names = run.list_dirs("experts")
    if not names:
        raise RunDirError(f"{run.uri_of('experts')}: no experts yet; run `selma train` first")
    return names


def find_step(run: RunDir, expert: str, step: int | str) -> ExportedStep:
    """``expert``'s LoRA at ``step`` (a number, or ``last``: its latest checkpoint, or the final expert
    of a run made before checkpoints were exported); a RunDirError naming the steps there are if none."""
    steps = exported_steps(run, expert)
    if step == LAST and steps:
        return steps[-1]
    if step == LAST and final_expert(run, expert) is not None:
        return final_expert(run, expert)
    for exported in steps:
        if exported.step == step:
            return exported
    raise RunDirError(f"{run.uri_of('experts', expert, CHECKPOINTS_DIR)}: no checkpoint at step {step}; "
                      f"exported steps: {', '.join(str(s.step) for s in steps) or 'none'}")


def export_experts(run: RunDir, step: int | str, experts: list[str] | None, out: str | Path) -> dict[str, ExportedStep]:
    """Copy each expert's LoRA at ``step`` (a number or ``last``) to ``out/<name>/``: the adapter files
    plus a model card naming the step. Every expert's step is found before anything is written."""
    names = expert_names(run)
    unknown = sorted(set(experts or ()) - set(names))
    if unknown:
        raise RunDirError(f"{run.uri_of('experts')}: no expert {', '.join(unknown)}; experts: {', '.join(names)}")
    chosen = {name: find_step(run, name, step) for name in (experts or names)}
    for name, exported in chosen.items():
        target = copy_adapter_files(run, exported.relative, Path(out) / name)
        card = model_card(name, exported, _base_model(target), run.uri_of(exported.relative))
        atomic_write(target / "README.md", lambda tmp, text=card: tmp.write_text(text))
    return chosen


def _base_model(folder: Path) -> str | None:
    config = folder / CONFIG_NAME
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.exists() else None


def model_card(expert: str, exported: ExportedStep, base_model: str | None, source: str) -> str:
    loss = f" (training loss {exported.loss:.4f})" if exported.loss is not None else ""
    which = "final expert" if exported.final else "checkpoint"
    return (
        f"---\nlibrary_name: diffusers\nbase_model: {base_model}\ntags:\n- lora\n- selma\n- text-to-image\n---\n\n"
        f"# SELMA expert `{expert}` at step {exported.step}\n\n"
        f"The expert's LoRA after {exported.step} training steps{loss}, exported by `selma experts export` "
        f"from its {which} `{source}`.\n\n"
        "```python\nfrom diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({base_model!r})\npipe.load_lora_weights('<this folder>')\n```\n"
    )


def format_listing(run: RunDir) -> str:
    """``selma experts list``: each expert's exported steps and the loss at each, and the step the
    run's ``train.select`` picks for the merge."""
    select = run.manifest().get("config", {}).get("train", {}).get("select", LAST)
    selected = parse_select(select)
    lines = [f"run: {run.uri}", f"train.select: {select} (* marks what the merge stage merges)"]
    merge = run.stage("merge")
    if merge.get("status") == "committed" and merge.get("step") is not None:
        lines.append(f"merged/: the experts at step {merge['step']} (train.select={merge.get('select', LAST)})")
    for name in expert_names(run):
        steps, final = exported_steps(run, name), final_expert(run, name)
        lines += ["", f"{name} ({'finished' if final else 'not finished'})", f"  {'step':>8}  {'loss':>8}"]
        for exported in steps:
            mark = "*" if exported.step == selected or (selected is None and final and exported.step == final.step) else ""
            lines.append(f"  {exported.step:>8}  {_loss(exported.loss):>8}  {mark}".rstrip())
        if final and not steps:
            mark = "*" if selected is None else ""
            lines.append(f"  {'final':>8}  {_loss(final.loss):>8}  {mark}  (no checkpoints exported)")
    return "\n".join(lines)


def _loss(loss: float | None) -> str:
    return f"{loss:.4f}" if loss is not None else "-"
