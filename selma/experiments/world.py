"""SELMA measured in the shapes world: ``selma world experiment OUT`` and ``selma world report OUT``.

Every arm runs through the stages a user runs on SDXL; only the training images differ:

=================  ==============================================================================
arm                what is trained
=================  ==============================================================================
base               nothing: the base model
experts            SELMA: one LoRA per skill on the base model's own images of generated prompts
delta_mean         the experts merged (``merge.method: delta_mean``, the paper's merge)
ab_mean            the experts merged by averaging their A and B factors
joint              one LoRA on all skills' images (``train.mode: joint``)
filtered           experts on the self-generated images the exact evaluator accepts
verifier           experts on the self-generated images on which the run's VQA backend (eval.vqa)
                   answers every DSG question "yes" (the filter a user without an exact evaluator has)
ground_truth       experts on ground-truth renders of the same prompts (same counts), once per
                   seed of ``truth_seeds``: the calibration, what perfect data does
weak_to_strong     experts on images a smaller base model (``world:small``) draws for the same
                   prompts, trained into the larger one
=================  ==============================================================================

Experts are scored on their own skill, the others on every skill, on held-out test captions
(the test split, which the world skills' ``accept`` keeps out of prompt generation). Layout::

    OUT/selma/            the SELMA run (prompts, images, experts, merged; eval/ for every model)
    OUT/joint/, OUT/filtered/, OUT/verifier/   runs whose images are derived from OUT/selma's
    OUT/ground_truth-seedN/   runs of renders of OUT/selma's prompts
    OUT/weak_to_strong/   a run whose images the smaller base draws
    OUT/merged-ab_mean/   the ab_mean merge
    OUT/report.md, OUT/report.png, OUT/experiment.json
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from selma.config import build_config
from selma.core.config import apply_override, parse_override
from selma.core.errors import ConfigError
from selma.core.models import resolve_model
from selma.core.rundir import RunDir
from selma.core.scoring import mean_and_stderr
from selma.core.stage import StageBase, StageContext
from selma.eval.report import grouped_bars
from selma.eval.vqa import vqa_backend_of
from selma.images.export import png_bytes_of, with_hf_features
from selma.images.generator import png_bytes
from selma.images.stage import IMAGE_COLUMNS, planned_images, prompts_to_draw
from selma.merge.methods import merge_experts
from selma.pipeline import run_eval, run_stages
from selma.world import WorldEvaluator, parse_caption, render
from selma.world.evaluator import questions
from selma.world.scene import CANVAS, SKILL_KINDS, Scene, place_objects

ARMS = ("base", "experts", "delta_mean", "ab_mean", "joint", "filtered", "verifier", "ground_truth",
        "weak_to_strong")
ARM_TITLES = {
    "base": "base model",
    "experts": "SELMA expert (own skill)",
    "delta_mean": "SELMA merged (delta_mean)",
    "ab_mean": "SELMA merged (ab_mean)",
    "joint": "one joint LoRA, all skills",
    "filtered": "expert on evaluator-filtered own images",
    "verifier": "expert on own images the VQA backend accepts",
    "ground_truth": "expert on ground-truth renders",
    "weak_to_strong": "expert on a smaller base's images (weak-to-strong)",
}
PER_SKILL_ARMS = ("experts", "filtered", "verifier", "ground_truth", "weak_to_strong")
WEAK_MODEL = "world:small"
TRUTH_SEEDS = (0, 1)


def skill_kind(skill: str) -> str:
    """The caption kind a world skill is scored on."""
    kinds = SKILL_KINDS.get(skill)
    if not kinds or len(kinds) != 1:
        one_kind = sorted(s for s, k in SKILL_KINDS.items() if len(k) == 1)
        raise ValueError(f"skill {skill!r} is not a one-kind world skill; the experiment takes {one_kind}")
    return kinds[0]


def _with(config, **fields):
    """A validated copy of ``config`` with top-level fields or ``section.field`` keys replaced."""
    data = config.model_dump(mode="json")
    for key, value in fields.items():
        apply_override(data, key.split("__"), value)
    return build_config(data)


def check_experiment(config, arms: tuple[str, ...]) -> None:
    """Fail before any work on arms, skills or an evaluation the experiment cannot run."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; arms: {', '.join(ARMS)}")
    try:
        for skill in config.skills.names:
            skill_kind(skill)
    except ValueError as err:
        raise ConfigError(f"skills.names: {err}") from None
    if config.train.mode != "experts":
        raise ConfigError("train.mode: the experiment trains experts (the joint arm is one of its arms)")
    if config.eval.vqa.backend != "world":
        raise ConfigError("eval.vqa.backend: the experiment scores with the exact evaluator (world)")


# --------------------------------------------------------------------------- derived training data


def _decoded(images: pa.Table) -> list[Image.Image]:
    return [Image.open(io.BytesIO(png_bytes_of(image))).convert("RGB") for image in images.column("image").to_pylist()]


def filtered_images(images: pa.Table, config=None) -> pa.Table:
    """The self-generated images the exact evaluator finds to be exactly their prompt."""
    evaluator = WorldEvaluator()
    keep = [evaluator.prompt_accuracy(image, prompt)
            for image, prompt in zip(_decoded(images), images.column("prompt").to_pylist())]
    return images.filter(pa.array(keep, pa.bool_()))


def verified_images(images: pa.Table, config) -> pa.Table:
    """The self-generated images on which the run's own VQA backend (``eval.vqa``) answers every
    DSG question of their prompt "yes": the filter a user without an exact evaluator has."""
    backend = vqa_backend_of(config.eval.vqa)
    keep = []
    with backend:
        for image, prompt in zip(_decoded(images), images.column("prompt").to_pylist()):
            asked = [row["question"] for row in questions(prompt)]
            keep.append(all(answer == "yes" for answer in backend.answer([image] * len(asked), asked)))
    return images.filter(pa.array(keep, pa.bool_()))


def _render_png(prompt: str, seed: int) -> bytes:
    graph = parse_caption(prompt)
    return png_bytes(render(Scene(place_objects(graph, int(seed)), graph, int(seed))) / 255.0)


def ground_truth_images(prompts: pa.Table, images_per_prompt: int, seed: int) -> pa.Table:
    """The images stage's rows for ``prompts`` (same image ids and seeds), each image a render of
    a random scene its prompt states: no diffusion model involved."""
    plan = planned_images(prompts.select(["prompt_id", "skill", "prompt"]), images_per_prompt, seed)
    renders = [_render_png(p, s) for p, s in zip(plan.column("prompt").to_pylist(), plan.column("seed").to_pylist())]
    n = plan.num_rows
    table = plan.append_column("image", pa.array(renders, pa.binary()))
    for name, column in (("width", pa.array([CANVAS] * n, pa.int32())), ("height", pa.array([CANVAS] * n, pa.int32())),
                         ("model", pa.array(["selma.world.render"] * n, pa.string())),
                         ("steps", pa.array([0] * n, pa.int32())), ("guidance_scale", pa.array([0.0] * n, pa.float32()))):
        table = table.append_column(name, column)
    return with_hf_features(table.select(IMAGE_COLUMNS))


class DerivedImages(StageBase):
    """The image stage of a derived run: ``tables`` (made from the SELMA run's prompts or images)
    committed as its images, in place of drawing any; the train stage then runs on them as on drawn ones."""

    name = "images"
    writes = ("images",)
    sections = ("model", "images")
    needs_ray = False

    def __init__(self, tables: dict[str, pa.Table], source: RunDir, derived: str):
        self.tables, self.source, self.derived = tables, source, derived

    def run(self, ctx: StageContext) -> dict:
        for skill in ctx.config.skills.names:
            ctx.run.write_table(f"images/{skill}/part-0.parquet", self.tables[skill])
        return {"counts": {s: t.num_rows for s, t in self.tables.items()}, "source": self.source.uri,
                "derived": self.derived}


def derived_tables(source: RunDir, config, name: str, progress: Callable[[str], None]) -> dict[str, pa.Table]:
    """``name``'s training images per skill, made from ``source``'s prompts (ground_truth) or images."""
    tables = {}
    for skill in config.skills.names:
        if name == "ground_truth":
            prompts = source.read_table("prompts", skill)
            if prompts is None:
                raise RuntimeError(f"{source.uri} has no prompts of {skill}; the SELMA run must write them first")
            tables[skill] = ground_truth_images(prompts_to_draw(prompts, [skill]), config.images.images_per_prompt,
                                                config.images.seed)
            continue
        images = source.read_table("images", skill)
        if images is None:
            raise RuntimeError(f"{source.uri} has no images of {skill}; the SELMA run must finish first")
        transform = {"joint": lambda table, _: table, "filtered": filtered_images, "verifier": verified_images}[name]
        tables[skill] = transform(images, config)
        progress(f"[world] {name}: {tables[skill].num_rows} of {images.num_rows} {skill} images")
    return tables


def derive_run(source: RunDir, config, name: str, progress: Callable[[str], None]):
    """Train ``name``'s arm: a run whose images are made from ``source``'s (see :func:`derived_tables`).

    Its skills are those left with enough images to train on (a filter may accept too few of a
    skill's images); returns its config, or None when no skill has enough.
    """
    if RunDir(config.resolved_run_dir()).stage("train").get("status") == "committed":
        return config  # done: a rerun neither re-filters nor re-renders
    tables = derived_tables(source, config, name, progress)
    least = config.train.batch_size * config.train.resources.workers
    enough = [s for s, t in tables.items() if t.num_rows >= least] if name != "joint" else list(tables)
    if not enough:
        progress(f"[world] {name}: no skill has the {least} images a training step needs; not trained")
        return None
    if len(enough) < len(tables):
        progress(f"[world] {name}: {sorted(set(tables) - set(enough))} have fewer than {least} images; not trained")
    config = _with(config, skills__names=enough)
    run_stages(config, ("images", "train"), progress=progress,
               replaced={"images": DerivedImages(tables, source, name)})
    return config


def truth_run_name(seed: int) -> str:
    return f"ground_truth-seed{seed}"


# --------------------------------------------------------------------------- the experiment


def run_experiment(config, out: str | Path, arms: tuple[str, ...] = ARMS, progress: Callable[[str], None] = print, *,
                   truth_seeds: tuple[int, ...] = TRUTH_SEEDS, weak_model: str = WEAK_MODEL) -> dict:
    """Train and score every arm into ``out``; write the report. Reruns skip what is done.

    The ground-truth arm (the calibration: what perfect data does) is trained once per seed of
    ``truth_seeds``; every other arm once, with ``train.seed``.
    """
    check_experiment(config, arms)
    if "weak_to_strong" in arms:
        try:
            resolve_model(weak_model)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--weak-model: {err} (or give --weak-model a model folder, or leave weak_to_strong "
                              "out of --arms)") from None
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(phase: str, work: Callable[[], object]):
        started = time.perf_counter()
        result = work()
        seconds[phase] = round(time.perf_counter() - started, 1) + seconds.get(phase, 0.0)
        return result

    skills = list(config.skills.names)
    kinds = [skill_kind(s) for s in skills]
    main = _with(config, run_dir=str(out / "selma"), merge__method="delta_mean")
    run = RunDir(str(out / "selma"))
    ab_mean = out / "merged-ab_mean"
    shared = {"base": "base", "delta_mean": "merged", "ab_mean": f"ab_mean={ab_mean}",
              "joint": f"joint={out / 'joint' / 'experts' / 'joint'}"}  # arms scored on every skill

    def score(scored: set[str]) -> None:
        models = [spec for arm, spec in shared.items() if arm in scored]
        if models:
            timed("eval", lambda: run_eval(_with(main, eval__models=models, eval__world_kinds=kinds), run, progress))
        for skill in skills:
            own = [spec for arm in PER_SKILL_ARMS if arm in scored
                   for spec in own_skill_models(out, arm, skill, truth_seeds)]
            if own:
                timed("eval", lambda: run_eval(_with(main, eval__models=own, eval__world_kinds=[skill_kind(skill)]),
                                               run, progress))

    def report():
        record = {"config": main.model_dump(mode="json"), "arms": list(arms), "seconds": seconds,
                  "truth_seeds": list(truth_seeds), "weak_model": weak_model if "weak_to_strong" in arms else None,
                  "machine": _machine(), "training_images": training_image_counts(out, skills, arms, truth_seeds)}
        (out / "experiment.json").write_text(json.dumps(record, indent=2) + "\n")
        return write_experiment_report(out, progress)

    timed("prompts", lambda: run_stages(main, ("prompts",), progress=progress))
    # Calibration first: what perfect data does for this recipe, against the base model; its
    # report is written before any SELMA arm is trained.
    if "ground_truth" in arms:
        for seed in truth_seeds:
            wanted = _with(main, run_dir=str(out / truth_run_name(seed)), train__seed=seed)
            timed("ground_truth", lambda: derive_run(run, wanted, "ground_truth", progress))
    score({"base", "ground_truth"} & set(arms))
    report()

    selma_arms = {"experts", "delta_mean", "ab_mean", "joint", "filtered", "verifier"} & set(arms)
    if selma_arms:
        timed("selma", lambda: run_stages(main, ("images", "train", "merge"), progress=progress))
    if "ab_mean" in arms and not (ab_mean / "merge.json").is_file():
        timed("ab_mean", lambda: merge_experts({s: run.path("experts", s) for s in skills}, ab_mean, method="ab_mean"))
    for name in ("joint", "filtered", "verifier"):
        if name in arms:
            wanted = _with(main, run_dir=str(out / name), **({"train__mode": "joint"} if name == "joint" else {}))
            timed(name, lambda: derive_run(run, wanted, name, progress))
    if "weak_to_strong" in arms:
        weak = _with(main, run_dir=str(out / "weak_to_strong"), images__model=weak_model)
        timed("weak_to_strong", lambda: run_stages(weak, ("prompts", "images", "train"), progress=progress))
    score(set(arms))
    return report()


# --------------------------------------------------------------------------- calibration

CALIBRATION_KINDS = ("counting", "binding")
CALIBRATION_MARGIN = 0.10
# The recipes `selma world calibrate` sweeps by default, each a set of overrides of the world
# preset: v1's recipe (the world config's) and a larger LoRA budget.
DEFAULT_RECIPES: dict[str, list[str]] = {
    "v1": ["train.rank=8", "train.alpha=8", "train.learning_rate=5e-4", "train.max_steps=300",
           "prompts.per_skill=30", "images.images_per_prompt=10"],
    "r32-1k": ["train.rank=32", "train.alpha=32", "train.learning_rate=1e-3", "train.max_steps=1000",
               "prompts.per_skill=200", "images.images_per_prompt=4"],
}
_RECIPE_SECTIONS = ("train", "prompts", "images")


def _with_overrides(config, overrides: list[str]):
    data = config.model_dump(mode="json")
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in _RECIPE_SECTIONS or path[:2] == ["images", "model"]:
            raise ConfigError(f"{'.'.join(path)}: a recipe sets train.*, prompts.* and images.* (not images.model); "
                              "the base model and the evaluation stay those of the config")
        apply_override(data, path, value)
    return build_config(data)


def run_calibration(config, out: str | Path, recipes: dict[str, list[str]] | None = None,
                    truth_seeds: tuple[int, ...] = TRUTH_SEEDS, progress: Callable[[str], None] = print) -> dict:
    """``selma world calibrate OUT``: the ground-truth arm under each LoRA recipe, on counting and
    binding, against the base model; writes OUT/calibration.md and calibration.json.

    A recipe passes when, for every calibrated kind, the ground-truth experts (pooled over
    ``truth_seeds``) beat the base by at least :data:`CALIBRATION_MARGIN` of prompt accuracy.
    Reruns skip what is done; every recipe is scored on the same held-out prompts and image seeds.
    """
    recipes = DEFAULT_RECIPES if recipes is None else recipes
    skills = [s for s in config.skills.names if skill_kind(s) in CALIBRATION_KINDS]
    check_experiment(config, ("ground_truth",))
    if not skills:
        raise ConfigError(f"skills.names: calibration needs a skill of kind {' or '.join(CALIBRATION_KINDS)}")
    configs = {name: _with_overrides(config, overrides) for name, overrides in recipes.items()}  # all checked first
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    every_kind = [skill_kind(s) for s in config.skills.names]  # the base is scored on every skill's kind
    base_config = _with(config, run_dir=str(out / "base"), eval__models=["base"], eval__world_kinds=every_kind)
    run_eval(base_config, RunDir(str(out / "base")), progress)
    base = accuracy_by_kind(RunDir(str(out / "base")), "base")
    rows = []
    for name, recipe_config in configs.items():
        folder = out / name
        main = _with(recipe_config, run_dir=str(folder / "selma"), skills__names=skills)
        started = time.perf_counter()
        run_stages(main, ("prompts",), progress=progress)
        run = RunDir(str(folder / "selma"))
        for seed in truth_seeds:
            derive_run(run, _with(main, run_dir=str(folder / truth_run_name(seed)), train__seed=seed), "ground_truth",
                       progress)
        trained = time.perf_counter() - started
        for skill in skills:
            own = own_skill_models(folder, "ground_truth", skill, truth_seeds)
            run_eval(_with(main, eval__models=own, eval__world_kinds=[skill_kind(skill)]), run, progress)
        row = {"recipe": name, "overrides": recipes[name], "seconds_to_train": round(trained, 1), "kinds": {}}
        for skill in skills:
            kind = skill_kind(skill)
            pooled = accuracy_by_kind(run, arm_models("ground_truth", skill, truth_seeds)).get(kind)
            seeds = {seed: accuracy_by_kind(run, f"ground_truth-seed{seed}-{skill}").get(kind) for seed in truth_seeds}
            row["kinds"][kind] = {"ground_truth": pooled, "seeds": seeds,
                                  "gain": pooled["accuracy"] - base[kind]["accuracy"] if pooled else None}
        row["passes"] = all(k["gain"] is not None and k["gain"] >= CALIBRATION_MARGIN for k in row["kinds"].values())
        rows.append(row)
        progress(f"[calibrate] {name}: " + ", ".join(
            f"{kind} {100 * base[kind]['accuracy']:.1f} -> {100 * k['ground_truth']['accuracy']:.1f}"
            for kind, k in row["kinds"].items() if k["ground_truth"]) + (" (passes)" if row["passes"] else ""))
    rows = earlier_recipe_rows(out / "calibration.json", rows)
    record = {"config": config.model_dump(mode="json"), "truth_seeds": list(truth_seeds), "base": base,
              "recipes": rows, "machine": _machine()}
    (out / "calibration.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "calibration.md").write_text(markdown_calibration(record))
    progress(f"[calibrate] {out / 'calibration.md'}")
    return record


def earlier_recipe_rows(record_file: Path, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of an earlier ``calibrate`` into the same folder (same base scores,
    prompts and image seeds) for recipes not rerun now, so the table grows one recipe at a time."""
    if not record_file.is_file():
        return rows
    rerun = {row["recipe"] for row in rows}
    return [row for row in json.loads(record_file.read_text())["recipes"] if row["recipe"] not in rerun] + rows


def markdown_calibration(record: dict) -> str:
    base, rows = record["base"], record["recipes"]
    kinds = [k for k in CALIBRATION_KINDS if k in base]
    evaluation = record["config"]["eval"]
    first = next(iter(base.values()))
    lines = ["# Calibration: does perfect data help?", "",
             f"Experts trained on ground-truth renders of their skill's prompts, against the base model. Prompt "
             f"accuracy in %, mean ± s.e. over {first['prompts']} held-out prompts × {evaluation['images_per_prompt']} "
             f"image seeds, pooled over training seeds {', '.join(map(str, record['truth_seeds']))} (each seed in "
             f"brackets). A recipe passes when it beats the base by ≥ {100 * CALIBRATION_MARGIN:.0f} points on every kind.",
             "", "| recipe | " + " | ".join(kinds) + " | passes | minutes to train | overrides |",
             "|---|" + "---|" * (len(kinds) + 3),
             "| base model | " + " | ".join(f"{100 * base[k]['accuracy']:.1f} ± {100 * base[k]['stderr']:.1f}"
                                          for k in kinds) + " | | | |"]
    others = [k for k in base if k not in kinds]
    for row in rows:
        cells = []
        for kind in kinds:
            cell = row["kinds"].get(kind, {})
            pooled = cell.get("ground_truth")
            if not pooled:
                cells.append("-")
                continue
            seeds = "; ".join(f"{100 * v['accuracy']:.1f}" for v in cell["seeds"].values() if v)
            cells.append(f"{100 * pooled['accuracy']:.1f} ± {100 * pooled['stderr']:.1f} "
                         f"({100 * cell['gain']:+.1f}) [{seeds}]")
        lines.append(f"| {row['recipe']} | " + " | ".join(cells) + f" | {'yes' if row['passes'] else 'no'} | "
                     f"{row['seconds_to_train'] / 60:.1f} | `{' '.join(row['overrides'])}` |")
    if others:
        lines += ["", "The base model on the other kinds: " + ", ".join(
            f"{kind} {100 * base[kind]['accuracy']:.1f} ± {100 * base[kind]['stderr']:.1f}" for kind in others) + "."]
    return "\n".join(lines) + "\n"


def _arm_runs(arm: str, truth_seeds) -> list[tuple[str, str]]:
    """(eval model prefix, run folder) per training run of a per-skill arm."""
    if arm == "ground_truth":
        return [(f"ground_truth-seed{seed}", truth_run_name(seed)) for seed in truth_seeds]
    return [(arm, arm)]


def own_skill_models(out: Path, arm: str, skill: str, truth_seeds) -> list[str]:
    """Eval model specs (``name`` or ``name=path``) of a per-skill arm's experts of ``skill``."""
    if arm == "experts":
        return [f"expert-{skill}"]
    return [f"{prefix}-{skill}={out / folder / 'experts' / skill}" for prefix, folder in _arm_runs(arm, truth_seeds)
            if (out / folder / "experts" / skill).is_dir()]


def training_image_counts(out: Path, skills: list[str], arms, truth_seeds=TRUTH_SEEDS) -> dict[str, dict[str, int]]:
    counts = {}
    folders = {"selma": "selma", "filtered": "filtered", "verifier": "verifier",
               "ground_truth": truth_run_name(truth_seeds[0]) if truth_seeds else None,
               "weak_to_strong": "weak_to_strong"}
    for name, folder in folders.items():
        if folder and (out / folder / "run.json").is_file() and (name == "selma" or name in arms):
            stage = RunDir(str(out / folder)).stage("images")
            counts[name] = {s: stage.get("counts", {}).get(s) for s in skills}
    return counts


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- the report


def arm_models(arm: str, skill: str, truth_seeds=TRUTH_SEEDS) -> list[str]:
    """The eval model names under which ``arm`` is scored on ``skill``'s kind (one per training seed)."""
    if arm == "experts":
        return [f"expert-{skill}"]
    if arm in PER_SKILL_ARMS:
        return [f"{prefix}-{skill}" for prefix, _ in _arm_runs(arm, truth_seeds)]
    return ["merged" if arm == "delta_mean" else arm]


def accuracy_by_kind(run: RunDir, models: str | list[str]) -> dict[str, dict]:
    """Prompt accuracy per caption kind: mean over prompts ± s.e. over prompts. A prompt's accuracy
    is the mean over its images, pooled over ``models`` (several training seeds of one arm)."""
    items: dict[str, list[tuple[float, float]]] = {}
    found = 0
    for model in [models] if isinstance(models, str) else models:
        if not run.exists("eval", model, "world-images.parquet"):
            continue
        found += 1
        table = pq.read_table(run.path("eval", model, "world-images.parquet"))
        for item, accuracy, score in zip(table.column("item_id").to_pylist(),
                                         table.column("reward_prompt_accuracy").to_pylist(),
                                         table.column("score").to_pylist()):
            items.setdefault(item, []).append((accuracy, score))
    result = {}
    for kind in sorted({item.rsplit("_", 1)[0] for item in items}):
        per_item = [v for item, v in items.items() if item.rsplit("_", 1)[0] == kind]
        means = [sum(a for a, _ in values) / len(values) for values in per_item]
        scores = [sum(s for _, s in values) / len(values) for values in per_item]
        n = len(means)
        mean, stderr = mean_and_stderr(means)
        result[kind] = {"accuracy": mean, "stderr": stderr, "dsg": sum(scores) / n,
                        "prompts": n, "images": sum(len(v) for v in per_item)}
        if found > 1:
            result[kind]["runs"] = found
    return result


def experiment_results(out: Path) -> dict:
    record = json.loads((out / "experiment.json").read_text())
    skills = record["config"]["skills"]["names"]
    truth_seeds = tuple(record.get("truth_seeds", TRUTH_SEEDS))
    run = RunDir(str(out / "selma"))
    results: dict[str, dict[str, dict]] = {}
    for arm in record["arms"]:
        for skill in skills:
            kind = skill_kind(skill)
            cell = accuracy_by_kind(run, arm_models(arm, skill, truth_seeds)).get(kind)
            if cell:
                results.setdefault(arm, {})[kind] = cell
            if arm == "ground_truth" and len(truth_seeds) > 1:
                for seed in truth_seeds:
                    single = accuracy_by_kind(run, f"ground_truth-seed{seed}-{skill}").get(kind)
                    if single:
                        results.setdefault(f"ground_truth-seed{seed}", {})[kind] = single
    return {"record": record, "kinds": [skill_kind(s) for s in skills], "results": results}


def _cell(cell: dict | None, base: dict | None) -> str:
    if not cell:
        return "-"
    text = f"{100 * cell['accuracy']:.1f} ± {100 * cell['stderr']:.1f}"
    if base and cell is not base:
        text += f" ({100 * (cell['accuracy'] - base['accuracy']):+.1f})"
    return text


def markdown_experiment(data: dict) -> str:
    record, kinds, results = data["record"], data["kinds"], data["results"]
    cfg = record["config"]
    base = results.get("base", {})
    any_cell = next((c for r in results.values() for c in r.values()), {})
    lines = [
        "# SELMA in the shapes world", "",
        f"Prompt accuracy in % (the image shows exactly its caption: every object, count, colour and relation, "
        f"nothing more), mean ± standard error over {any_cell.get('prompts', '?')} held-out test prompts per skill, "
        f"{cfg['eval']['images_per_prompt']} seeds each; in brackets the change from the base model. "
        f"Experts are scored on their own skill; merged and joint adapters on every skill. "
        f"The ground-truth arm pools {len(record.get('truth_seeds', [0]))} training seeds (each seed's row below it).", "",
        "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm in record["arms"]:
        row = results.get(arm, {})
        lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(_cell(row.get(k), base.get(k)) for k in kinds) + " |")
        if arm == "ground_truth":
            for seed in record.get("truth_seeds", []):
                row = results.get(f"ground_truth-seed{seed}")
                if row:
                    lines.append(f"| &nbsp;&nbsp;training seed {seed} | "
                                 + " | ".join(_cell(row.get(k), base.get(k)) for k in kinds) + " |")
    lines += ["", "DSG score (mean over each image's DSG questions, with the dependency rule), %:", "",
              "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm in record["arms"]:
        row = results.get(arm, {})
        lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(
            f"{100 * row[k]['dsg']:.1f}" if k in row else "-" for k in kinds) + " |")
    counts = record.get("training_images", {})
    if counts:
        skills = cfg["skills"]["names"]
        lines += ["", "Training images per skill (filtered: those the evaluator accepts):", "",
                  "| data | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills)]
        for name, row in counts.items():
            label = "self-generated (SELMA)" if name == "selma" else name
            lines.append(f"| {label} | " + " | ".join(str(row.get(s, "-")) for s in skills) + " |")
    train, images, evaluation = cfg["train"], cfg["images"], cfg["eval"]
    machine = record.get("machine", {})
    lines += ["", "## Setup", "",
              f"- base model `{cfg['model']}`; images {images['steps']} DDIM steps, guidance {images['guidance_scale']}, "
              f"{images['images_per_prompt']} per prompt; {cfg['prompts']['per_skill']} prompts per skill "
              f"({cfg['prompts']['backend']} backend)",
              f"- LoRA rank {train['rank']}, alpha {train['alpha']}, lr {train['learning_rate']}, "
              f"batch {train['effective_batch_size']}, {train['max_steps']} steps",
              f"- seeds: images.seed {images['seed']}, train.seed {train['seed']}, eval.seed {evaluation['seed']}, "
              f"eval.sample_seed {evaluation['sample_seed']}",
              f"- machine: {machine.get('cpus')} CPUs, torch {machine.get('torch')}"
              + (f", {machine['gpu']}" if machine.get("gpu") else "")
              + "; minutes per phase: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in record.get("seconds", {}).items()),
              "- full config: experiment.json"]
    return "\n".join(lines) + "\n"


def experiment_chart(data: dict) -> bytes:
    kinds, results = data["kinds"], data["results"]
    series = {ARM_TITLES[arm]: ([100 * results.get(arm, {}).get(k, {}).get("accuracy", 0.0) for k in kinds],
                                [100 * results.get(arm, {}).get(k, {}).get("stderr", 0.0) for k in kinds])
              for arm in data["record"]["arms"]}
    return grouped_bars(kinds, series, ylabel="prompt accuracy, %", title="SELMA in the shapes world (held-out prompts)",
                        width_per_bar=0.45)


def write_experiment_report(out: str | Path, progress: Callable[[str], None] = print) -> dict:
    """``selma world report OUT``: report.md, report.png and the numbers in experiment.json."""
    out = Path(out)
    if not (out / "experiment.json").is_file():
        raise FileNotFoundError(f"{out} holds no experiment.json; run `selma world experiment {out}` first")
    data = experiment_results(out)
    (out / "report.md").write_text(markdown_experiment(data))
    (out / "report.png").write_bytes(experiment_chart(data))
    record = data["record"]
    record["results"] = data["results"]
    (out / "experiment.json").write_text(json.dumps(record, indent=2) + "\n")
    progress(f"[world] report: {out / 'report.md'} and report.png")
    return {"markdown": str(out / "report.md"), "chart": str(out / "report.png"), "results": data["results"]}
