"""The merge stage: combine the run's experts into ``merged/``, a CPU task over adapter files.
(:mod:`selma.merge.adapters` is the same merge over any adapter folders: ``selma merge-adapters``.)"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from selma.core.progress import Progress
from selma.core.rundir import RunDir, RunDirError
from selma.core.stage import StageBase, StageContext
from selma.core.vae import check_vae
from selma.merge.methods import merge_experts


class MergeStage(StageBase):
    """The experts merged into one adapter: a CPU task over adapter files, no cluster."""

    name = "merge"
    reads = ("experts",)
    writes = ("merged",)
    sections = ("merge",)
    needs = "train"
    needs_ray = False

    def preflight(self, config, run: RunDir) -> None:
        if config.merge.fused_pipeline:
            check_vae(config.vae, config.model)

    def run(self, ctx: StageContext) -> dict:
        return run_merge_stage(ctx.config, ctx.run, ctx.progress)


def run_merge_stage(config, run: RunDir, progress=None) -> dict:
    names = config.expert_names
    missing = [s for s in names if not run.exists("experts", s)]
    if missing:
        raise RunDirError(f"{run.uri_of('experts')}: no trained expert for skill(s) {missing}; run `selma train` first")
    merge = config.merge
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="selma-merge-") as out:
        experts = {s: stack.enter_context(run.local_copy(f"experts/{s}")) for s in names}
        report = merge_experts(
            experts, Path(out), method=merge.method, weights=merge.weights, normalize=merge.normalize,
            options=merge.options, fuse_into=config.model if merge.fused_pipeline else None, fused_vae=config.vae,
        )
        run.put_dir(out, "merged")
    fused = " (+ fused pipeline in merged/fused)" if merge.fused_pipeline else ""
    Progress.of(progress)(f"[merge] {merge.method} of {len(experts)} experts → {run.uri_of('merged')}{fused}")
    return {
        "method": merge.method,
        "experts": sorted(experts),
        "exact": report["exact"],
        "retained_energy": report["retained_energy"],
        "fused_pipeline": bool(merge.fused_pipeline),
    }
