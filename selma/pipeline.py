"""The stage list, stage hashes and the resume logic shared by ``selma run``, each stage command,
``selma eval`` and the world experiment.

Each stage implements :class:`selma.core.stage.Stage`; this module orders them, checks a run
directory can take them before anything is written, holds the run's lock, and records each
stage's status in run.json. Adding a stage is one new module and one entry in ``STAGES``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Callable, Mapping

import selma
from selma.core.progress import Progress
from selma.core.rundir import RunDir, RunDirError
from selma.core.stage import Stage, StageContext
from selma.eval.run import EvalStage
from selma.images.stage import ImageStage
from selma.merge.stage import MergeStage
from selma.prompts.stage import PromptStage
from selma.raylib import init_ray
from selma.train.experts import TrainStage

STAGES: tuple[Stage, ...] = (PromptStage(), ImageStage(), TrainStage(), MergeStage(), EvalStage())
STAGE_NAMES = tuple(s.name for s in STAGES)
# ``selma run``'s stages: those committed under a config hash, each on the previous one's rows.
RUN_STAGE_NAMES = tuple(s.name for s in STAGES if s.chained)


def _stages(replaced: Mapping[str, Stage] | None = None) -> tuple[Stage, ...]:
    """The stage list, with some stages swapped for others of the same name (the world experiment
    commits derived images in place of drawing them)."""
    replaced = dict(replaced or {})
    unknown = set(replaced) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"no stage named {sorted(unknown)} to replace; stages: {STAGE_NAMES}")
    return tuple(replaced.get(stage.name, stage) for stage in STAGES)


def stage_hashes(config, *, legacy: bool = False, pin_unhashed: bool = True) -> dict[str, str]:
    """Each chained stage's hash covers its own sections and every upstream stage's hash; ``legacy``:
    the hashes run directories recorded before ``resources`` replaced each section's compute keys;
    ``pin_unhashed=False``: before nested pacing fields (``prompts.openai.qps``) left the hash."""
    hashes, upstream = {}, ""
    for stage in STAGES:
        if stage.chained:
            own = (config.legacy_section_hash(*stage.sections) if legacy
                   else config.section_hash(*stage.sections, pin_unhashed=pin_unhashed))
            upstream = hashlib.sha256(f"{upstream}:{own}".encode()).hexdigest()[:16]
            hashes[stage.name] = upstream
    return hashes


def accepted_hashes(config) -> dict[str, tuple[str, ...]]:
    """Each chained stage's hash, then its legacy hashes: a stage committed under any is this config's."""
    current, legacy = stage_hashes(config), stage_hashes(config, legacy=True)
    unpinned = stage_hashes(config, pin_unhashed=False)
    return {name: (current[name], legacy[name], *([unpinned[name]] if unpinned[name] != current[name] else []))
            for name in current}


def record_config(run: RunDir, config) -> None:
    """Write ``config`` into run.json: only once every check passed, under the run's lock."""
    run.update_manifest(
        selma_version=selma.__version__,
        created_at=run.manifest().get("created_at") or time.time(),
        config=config.model_dump(mode="json"),
    )


def plan_stages(config, run: RunDir, names: tuple[str, ...], *, restart: bool = False,
                replaced: Mapping[str, Stage] | None = None) -> list[Stage]:
    """The stages of ``names`` that must run, in order; raises :class:`RunDirError` if the run cannot
    take them (a stage made under another config, a stage it needs missing). Reads only."""
    stages = _stages(replaced)
    by_name = {stage.name: stage for stage in stages}
    hashes = accepted_hashes(config)
    discarded = _discarded_by_restart(names) if restart else set()

    def committed(name: str) -> bool:
        return name not in discarded and run.is_committed(name, *hashes[name])

    pending = [s for s in stages if s.name in names and (not s.chained or not committed(s.name))]
    for stage in pending:
        if stage.needs and by_name[stage.needs] not in pending and not committed(stage.needs):
            raise RunDirError(f"{run.uri}: stage {stage.name!r} needs stage {stage.needs!r} committed with this "
                              f"config; run `selma {stage.needs}` (or `selma run`) first")
        if stage.chained and stage.name not in discarded:
            run.check_stage_config(stage.name, *hashes[stage.name])
    return pending


def _discarded_by_restart(names: tuple[str, ...]) -> set[str]:
    """``--restart`` discards the first named stage and every chained stage after it."""
    first = STAGE_NAMES.index(names[0])
    return {s.name for s in STAGES[first:] if s.chained}


def _streaming_pairs(pending: list[Stage]) -> list[list[Stage]]:
    """Pending stages grouped to run: a stage with the stage it streams into, when both run."""
    groups: list[list[Stage]] = []
    for stage in pending:
        if groups and groups[-1][-1].streams_to == stage.name and len(groups[-1]) == 1:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def _on(stage: Stage, config) -> str:
    resources = stage.resources(config)
    return f" on {resources.describe()}" if resources is not None else ""


def run_stages(config, names: tuple[str, ...] = RUN_STAGE_NAMES, *, restart: bool = False,
               progress: Progress | Callable[[str], None] | None = None, run: RunDir | None = None,
               replaced: Mapping[str, Stage] | None = None) -> dict:
    """Run the named stages in order, skipping committed ones; returns the run summary.

    Every check runs before anything is written; the run directory is locked for the whole call;
    a stage that raises is marked ``failed`` with the reason, and a rerun resumes it.
    """
    progress = Progress.of(progress)
    run = run or RunDir(config.resolved_run_dir())
    pending = plan_stages(config, run, names, restart=restart, replaced=replaced)
    for stage in pending:
        stage.preflight(config, run)
    with run.lock():
        pending = plan_stages(config, run, names, restart=restart, replaced=replaced)  # again, now no one else writes
        hashes, stages = accepted_hashes(config), _stages(replaced)
        discarded = _discarded_by_restart(names) if restart else set()
        for stage in stages:
            if stage.name in discarded:
                run.discard_stage(stage.name, stage.writes)
                progress(f"[{stage.name}] discarded for --restart")
        if any(stage.chained for stage in pending):
            record_config(run, config)
        for stage in stages:
            if stage.name in names and stage not in pending:
                progress(f"[{stage.name}] already committed in {run.uri}, skipping")
        for group in _streaming_pairs(pending):
            _run_group(group, config, run, hashes, progress)
    return summarize(run)


def _run_group(group: list[Stage], config, run: RunDir, hashes: dict[str, tuple[str, ...]], progress: Progress) -> None:
    for stage in group:
        run.begin_stage(stage.name, *(hashes[stage.name] if stage.chained else (None,)))
    ctx = StageContext(config, run, progress)
    try:
        if any(stage.needs_ray for stage in group):
            init_ray(config.ray)
        if len(group) == 2:
            producer, consumer = group
            progress(f"[{producer.name}] running{_on(producer, config)}, streaming into "
                     f"[{consumer.name}]{_on(consumer, config)}")
            produced, consumed = producer.run_streaming(ctx, lambda stream: consumer.run(ctx.streaming(stream)))
            results = [produced, consumed if consumed is not None else consumer.run(ctx)]
        else:
            progress(f"[{group[0].name}] running{_on(group[0], config)}")
            results = [group[0].run(ctx)]
    except BaseException as err:
        for stage in group:
            with contextlib.suppress(Exception):
                run.fail_stage(stage.name, err)
        raise
    for stage, result in zip(group, results):
        run.commit_stage(stage.name, **result)


def run_eval(config, run: RunDir, progress: Progress | Callable[[str], None] | None = None) -> dict:
    """``selma eval``: the eval stage on ``run``; returns each model's summary and the report's files."""
    run_stages(config, ("eval",), progress=progress, run=run)
    entry = run.stage("eval")
    return {"models": {name: run.read_json(f"eval/{name}/summary.json") for name in entry["models"]},
            "report": entry["report"]}


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
