"""Stage order, stage hashes and the resume logic shared by ``selma run`` and each stage command."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import selma
from selma.core.rundir import RunDir, RunDirError


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


def stage_hashes(config, *, legacy: bool = False) -> dict[str, str]:
    """Each stage's hash covers its own sections and every upstream stage's hash; ``legacy``: the
    hashes run directories recorded before ``resources`` replaced each section's compute keys."""
    hashes, upstream = {}, ""
    for stage in STAGES:
        own = config.legacy_section_hash(*stage.sections) if legacy else config.section_hash(*stage.sections)
        upstream = hashlib.sha256(f"{upstream}:{own}".encode()).hexdigest()[:16]
        hashes[stage.name] = upstream
    return hashes


def accepted_hashes(config) -> dict[str, tuple[str, str]]:
    """Each stage's hash, then its legacy hash: a stage committed under either is this config's."""
    current, legacy = stage_hashes(config), stage_hashes(config, legacy=True)
    return {name: (current[name], legacy[name]) for name in STAGE_NAMES}


def record_config(run: RunDir, config) -> None:
    """Write ``config`` into run.json: only once every check passed, under the run's lock."""
    run.update_manifest(
        selma_version=selma.__version__,
        created_at=run.manifest().get("created_at") or time.time(),
        config=config.model_dump(mode="json"),
    )


def plan_stages(config, run: RunDir, names: tuple[str, ...], *, restart: bool = False) -> list[str]:
    """The stages of ``names`` that must run, in order; raises :class:`RunDirError` if the run cannot
    take them (a stage made under another config, an upstream stage missing). Reads only."""
    hashes = accepted_hashes(config)
    discarded = set(STAGE_NAMES[STAGE_NAMES.index(names[0]):]) if restart else set()
    pending = [s.name for s in STAGES if s.name in names
               and (s.name in discarded or not run.is_committed(s.name, *hashes[s.name]))]
    if not pending:
        return pending
    index = STAGE_NAMES.index(pending[0])
    upstream = STAGE_NAMES[index - 1] if index else None
    if upstream and (upstream in discarded or not run.is_committed(upstream, *hashes[upstream])):
        raise RunDirError(f"{run.uri}: stage {pending[0]!r} needs stage {upstream!r} committed with this config; "
                          f"run `selma {upstream}` (or `selma run`) first")
    for name in pending:
        if name not in discarded:
            run.check_stage_config(name, *hashes[name])
    return pending


def run_stages(config, names: tuple[str, ...] = STAGE_NAMES, *, restart: bool = False, progress=print) -> dict:
    """Run the named stages in order, skipping committed ones; returns the run summary.

    Every check runs before anything is written; the run directory is locked for the whole call;
    a stage that raises is marked ``failed`` with the reason, and a rerun resumes it.
    """
    from selma.raylib import init_ray

    run = RunDir(config.resolved_run_dir())
    pending = plan_stages(config, run, names, restart=restart)
    for stage in STAGES:
        if stage.name in pending and stage.preflight:
            stage.load(stage.preflight)(config)
    with run.lock():
        pending = plan_stages(config, run, names, restart=restart)  # again, now that no one else writes
        hashes = accepted_hashes(config)
        if restart:
            for later in STAGE_NAMES[STAGE_NAMES.index(names[0]):]:
                run.discard_stage(later)
                progress(f"[{later}] discarded for --restart")
        if pending:
            record_config(run, config)
        ran: list[str] = []
        for stage in STAGES:
            if stage.name not in names or stage.name in ran:
                continue
            if stage.name not in pending:
                progress(f"[{stage.name}] already committed in {run.uri}, skipping")
                continue
            together = ["prompts", "images"] if stage.name == "prompts" and "images" in pending else [stage.name]
            for name in together:
                run.begin_stage(name, *hashes[name])
            try:
                if stage.needs_ray:
                    init_ray(config.ray)
                if len(together) == 2:
                    progress("[prompts] running, streaming into [images]")
                    from selma.prompts.stage import run_prompts_and_images

                    results = run_prompts_and_images(config, run, progress=progress)
                else:
                    progress(f"[{stage.name}] running")
                    results = (stage.load()(config, run, progress=progress),)
            except BaseException as err:
                for name in together:
                    with contextlib.suppress(Exception):
                        run.fail_stage(name, err)
                raise
            for name, result in zip(together, results):
                run.commit_stage(name, **result)
            ran += together
    return summarize(run)


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
