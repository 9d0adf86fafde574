"""Stage order, stage hashes and the resume logic shared by ``selma run`` and each stage command."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import selma
from selma.rundir import RunDir


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections that decide this stage's output
    needs_ray: bool
    runner: str  # "module:function", imported when the stage runs
    preflight: str | None = None  # "module:function(config)": checks run before any stage starts

    def load(self, target: str | None = None) -> Callable:
        module, function = (target or self.runner).split(":")
        return getattr(__import__(module, fromlist=[function]), function)


STAGES = (
    Stage("prompts", ("skills", "prompts"), True, "selma.prompts.stage:run_prompt_stage"),
    Stage("images", ("model", "images"), True, "selma.images.stage:run_image_stage"),
    Stage("train", ("model", "train"), True, "selma.train.experts:run_train_stage",
          "selma.train.experts:preflight_train"),
    Stage("merge", ("merge",), False, "selma.merge.stage:run_merge_stage"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_hashes(config) -> dict[str, str]:
    """Each stage's hash covers its own sections and every upstream stage's hash."""
    hashes, upstream = {}, ""
    for stage in STAGES:
        own = config.section_hash(*stage.sections)
        upstream = hashlib.sha256(f"{upstream}:{own}".encode()).hexdigest()[:16]
        hashes[stage.name] = upstream
    return hashes


def open_run(config) -> RunDir:
    run = RunDir(config.resolved_run_dir())
    manifest = run.manifest()
    run.update_manifest(
        selma_version=selma.__version__,
        created_at=manifest.get("created_at") or time.time(),
        config=config.model_dump(mode="json"),
        stages=manifest.get("stages", {}),
    )
    return run


def run_stages(config, names: tuple[str, ...] = STAGE_NAMES, *, restart: bool = False, progress=print) -> dict:
    """Run the named stages in order, skipping committed ones; returns the run summary."""
    from selma.raylib import init_ray

    run = open_run(config)
    hashes = stage_hashes(config)
    if restart:
        first = STAGE_NAMES.index(names[0])
        for later in STAGE_NAMES[first:]:
            run.discard_stage(later)
            progress(f"[{later}] discarded for --restart")
    pending = [s.name for s in STAGES if s.name in names and not run.is_committed(s.name, hashes[s.name])]
    for stage in STAGES:
        if stage.name in pending and stage.preflight:
            stage.load(stage.preflight)(config)
    streamed: set[str] = set()
    for stage in STAGES:
        if stage.name not in names:
            continue
        if stage.name not in pending:
            if stage.name not in streamed and run.is_committed(stage.name, hashes[stage.name]):
                progress(f"[{stage.name}] already committed in {run.uri}, skipping")
            continue
        _require_upstream(run, stage.name, hashes)
        run.begin_stage(stage.name, hashes[stage.name])
        if stage.needs_ray:
            init_ray(config.ray)
        if stage.name == "prompts" and "images" in pending:
            run.begin_stage("images", hashes["images"])
            progress("[prompts] running, streaming into [images]")
            from selma.prompts.stage import run_prompts_and_images

            prompts, images = run_prompts_and_images(config, run, progress=progress)
            run.commit_stage("prompts", **prompts)
            run.commit_stage("images", **images)
            pending.remove("images")
            streamed.add("images")
            continue
        progress(f"[{stage.name}] running")
        result = stage.load()(config, run, progress=progress)
        run.commit_stage(stage.name, **result)
    return summarize(run)


def _require_upstream(run: RunDir, name: str, hashes: dict[str, str]) -> None:
    index = STAGE_NAMES.index(name)
    if index == 0:
        return
    upstream = STAGE_NAMES[index - 1]
    if not run.is_committed(upstream, hashes[upstream]):
        raise RuntimeError(f"stage {name!r} needs stage {upstream!r} committed in {run.uri} with this config; "
                           f"run `selma {upstream}` (or `selma run`) first")


def summarize(run: RunDir) -> dict:
    stages = run.manifest().get("stages", {})
    return {
        "run_dir": run.uri,
        "stages": {name: {"status": entry.get("status"), "seconds": entry.get("seconds")}
                   for name, entry in stages.items()},
        "prompts": stages.get("prompts", {}).get("counts", {}),
        "images": stages.get("images", {}).get("counts", {}),
        "experts": {s: e.get("loss") for s, e in stages.get("train", {}).get("experts", {}).items()},
        "merged": run.uri_of("merged") if stages.get("merge", {}).get("status") == "committed" else None,
    }


def format_summary(summary: dict) -> str:
    lines = [f"run directory: {summary['run_dir']}", "", f"{'skill':<22}{'prompts':>8}{'images':>8}{'expert loss':>13}"]
    skills = sorted(set(summary["prompts"]) | set(summary["images"]) | set(summary["experts"]))
    for skill in skills:
        loss = summary["experts"].get(skill)
        lines.append(f"{skill:<22}{summary['prompts'].get(skill, '-'):>8}{summary['images'].get(skill, '-'):>8}"
                     f"{(f'{loss:.4f}' if isinstance(loss, float) else '-'):>13}")
    lines.append("")
    for name, entry in summary["stages"].items():
        seconds = entry.get("seconds")
        lines.append(f"stage {name:<8} {entry.get('status') or '-':<10} {f'{seconds:.1f}s' if seconds else ''}")
    if summary["merged"]:
        lines += ["", f"merged adapter: {summary['merged']}"]
    return "\n".join(lines)
