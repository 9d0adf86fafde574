"""The merge stage: combine the run's experts into ``merged/``, a CPU task over adapter files.
(:mod:`selma.merge.adapters` is the same merge over any adapter folders: ``selma merge-adapters``.)

``train.select`` picks which step of each expert is merged: ``last``, the final experts
(``experts/<name>/``), or ``step:N``, their checkpoints at step N (``experts/<name>/checkpoints/step-N``).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from selma.core.expert_steps import check_select, checkpoint_relative, parse_select
from selma.core.progress import Progress
from selma.core.rundir import RunDir, RunDirError
from selma.core.stage import StageBase, StageContext
from selma.core.vae import check_vae
from selma.merge.lora_io import WEIGHT_NAME, atomic_write, copy_adapter_files
from selma.merge.methods import MERGE_REPORT_NAME, merge_experts


class MergeStage(StageBase):
    """The experts merged into one adapter: a CPU task over adapter files, no cluster."""

    name = "merge"
    reads = ("experts",)
    writes = ("merged",)
    sections = ("merge", "train.select")
    needs = "train"
    needs_ray = False

    def preflight(self, config, run: RunDir) -> None:
        check_select(config.train)
        if config.merge.fused_pipeline:
            check_vae(config.vae, config.model)

    def run(self, ctx: StageContext) -> dict:
        return run_merge_stage(ctx.config, ctx.run, ctx.progress)


def run_merge_stage(config, run: RunDir, progress=None) -> dict:
    names = config.expert_names
    step = parse_select(config.train.select)
    if step is None:
        sources = {s: f"experts/{s}" for s in names}
        missing = [s for s in names if not run.exists(sources[s], WEIGHT_NAME)]
        if missing:
            raise RunDirError(f"{run.uri_of('experts')}: no trained expert for skill(s) {missing}; run `selma train` first")
    else:
        sources = {s: checkpoint_relative(s, step) for s in names}
        missing = [run.uri_of(sources[s]) for s in names if not run.exists(sources[s], WEIGHT_NAME)]
        if missing:
            raise RunDirError(f"{', '.join(missing)}: no checkpoint at step {step} (train.select={config.train.select}); "
                              "`selma experts list` shows the steps there are")
    merge = config.merge
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="selma-merge-") as out:
        experts = {s: stack.enter_context(_local_adapter(run, sources[s])) for s in names}
        report = merge_experts(
            experts, Path(out), method=merge.method, weights=merge.weights, normalize=merge.normalize,
            options=merge.options, fuse_into=config.model if merge.fused_pipeline else None, fused_vae=config.vae,
        )
        picked = {"select": config.train.select, "step": step or config.train.max_steps,
                  "sources": {s: run.uri_of(sources[s]) for s in names}}
        report_text = json.dumps({**report, **picked}, indent=2)
        atomic_write(Path(out) / MERGE_REPORT_NAME, lambda tmp: tmp.write_text(report_text))
        run.put_dir(out, "merged")
    fused = " (+ fused pipeline in merged/fused)" if merge.fused_pipeline else ""
    at = f" at step {step}" if step is not None else ""
    Progress.of(progress)(f"[merge] {merge.method} of {len(experts)} experts{at} → {run.uri_of('merged')}{fused}")
    return {
        "method": merge.method,
        "experts": sorted(experts),
        "select": picked["select"],
        "step": picked["step"],
        "exact": report["exact"],
        "retained_energy": report["retained_energy"],
        "fused_pipeline": bool(merge.fused_pipeline),
    }


@contextmanager
def _local_adapter(run: RunDir, relative: str) -> Iterator[Path]:
    """A local folder holding the LoRA at ``relative``: the folder itself in a local run; from an object
    store its adapter files only, not the checkpoints and validation images an expert folder also holds."""
    if run.is_local:
        yield Path(run.path(relative))
        return
    with tempfile.TemporaryDirectory(prefix="selma-adapter-") as directory:
        yield copy_adapter_files(run, relative, directory)
