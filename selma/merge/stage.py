"""The merge stage: combine the run's experts into ``merged/`` (a CPU task over adapter files)."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from selma.rundir import RunDir


def run_merge_stage(config, run: RunDir, progress=print) -> dict:
    from selma.merge.methods import merge_experts

    missing = [s for s in config.skills.names if not run.exists("experts", s)]
    if missing:
        raise RuntimeError(f"merge: no trained expert for skill(s) {missing} in {run.uri}; run `selma train` first")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="selma-merge-") as out:
        experts = {s: stack.enter_context(run.local_copy(f"experts/{s}")) for s in config.skills.names}
        report = merge_experts(experts, Path(out), method=config.merge.method, weights=config.merge.weights)
        run.put_dir(out, "merged")
    progress(f"[merge] {config.merge.method} of {len(experts)} experts → {run.uri_of('merged')}")
    return {"method": config.merge.method, "experts": sorted(experts)}
