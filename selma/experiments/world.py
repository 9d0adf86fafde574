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
ground_truth       experts on ground-truth renders of the same prompts (same counts)
=================  ==============================================================================

Experts are scored on their own skill, the others on every skill, on held-out test captions
(the test split, which the world skills' ``accept`` keeps out of prompt generation). Layout::

    OUT/selma/            the SELMA run (prompts, images, experts, merged; eval/ for every model)
    OUT/joint/, OUT/filtered/, OUT/ground_truth/   runs whose images are derived from OUT/selma's
    OUT/merged-ab_mean/   the ab_mean merge
    OUT/report.md, OUT/report.png, OUT/experiment.json
"""

from __future__ import annotations

import io
import json
import math
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
from selma.core.config import apply_override
from selma.core.errors import ConfigError
from selma.core.rundir import RunDir
from selma.core.stage import StageBase, StageContext
from selma.eval.report import grouped_bars
from selma.images.export import png_bytes_of
from selma.images.generator import png_bytes
from selma.merge.methods import merge_experts
from selma.pipeline import run_eval, run_stages
from selma.world import WorldEvaluator, parse_caption, render
from selma.world.scene import SKILL_KINDS, Scene, place_objects

ARMS = ("base", "experts", "delta_mean", "ab_mean", "joint", "filtered", "ground_truth")
ARM_TITLES = {
    "base": "base model",
    "experts": "SELMA expert (own skill)",
    "delta_mean": "SELMA merged (delta_mean)",
    "ab_mean": "SELMA merged (ab_mean)",
    "joint": "one joint LoRA, all skills",
    "filtered": "expert on evaluator-filtered own images",
    "ground_truth": "expert on ground-truth renders",
}
DERIVED_ARMS = ("joint", "filtered", "ground_truth")
PER_SKILL_ARMS = ("experts", "filtered", "ground_truth")


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


def filtered_images(images: pa.Table) -> pa.Table:
    """The self-generated images the exact evaluator finds to be exactly their prompt."""
    evaluator = WorldEvaluator()
    keep = [evaluator.prompt_accuracy(Image.open(io.BytesIO(png_bytes_of(image))).convert("RGB"), prompt)
            for image, prompt in zip(images.column("image").to_pylist(), images.column("prompt").to_pylist())]
    return images.filter(pa.array(keep, pa.bool_()))


def ground_truth_images(images: pa.Table) -> pa.Table:
    """The same rows with each image replaced by a render of a random scene its prompt states."""
    renders = []
    for prompt, seed in zip(images.column("prompt").to_pylist(), images.column("seed").to_pylist()):
        graph = parse_caption(prompt)
        scene = Scene(place_objects(graph, int(seed)), graph, int(seed))
        renders.append(png_bytes(render(scene) / 255.0))
    index = images.schema.get_field_index("image")
    image_type = images.schema.field("image").type
    if pa.types.is_struct(image_type):  # HF Image feature: {bytes, path}
        column = pa.array([{"bytes": data, "path": None} for data in renders], image_type)
    else:
        column = pa.array(renders, image_type)
    table = images.set_column(index, images.schema.field("image"), column)
    return table.set_column(table.schema.get_field_index("model"), "model",
                            pa.array(["selma.world.render"] * table.num_rows, pa.string()))


class DerivedImages(StageBase):
    """The image stage of a derived run: ``tables`` (a transform of the SELMA run's images) committed
    as its images, in place of drawing any; the train stage then runs on them as on drawn ones."""

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


def derive_run(source: RunDir, config, name: str, progress: Callable[[str], None]):
    """Train ``name``'s arm: a run whose images are ``name``'s transform of ``source``'s.

    Its skills are those left with enough images to train on (the evaluator may accept too few
    of a skill's images); returns its config, or None when no skill has enough.
    """
    transform = {"joint": lambda table: table, "filtered": filtered_images, "ground_truth": ground_truth_images}[name]
    tables = {}
    for skill in config.skills.names:
        images = source.read_table("images", skill)
        if images is None:
            raise RuntimeError(f"{source.uri} has no images of {skill}; the SELMA run must finish first")
        tables[skill] = transform(images)
        progress(f"[world] {name}: {tables[skill].num_rows} of {images.num_rows} {skill} images")
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


# --------------------------------------------------------------------------- the experiment


def run_experiment(config, out: str | Path, arms: tuple[str, ...] = ARMS, progress: Callable[[str], None] = print) -> dict:
    """Train and score every arm into ``out``; write the report. Reruns skip what is done."""
    check_experiment(config, arms)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(phase: str, work: Callable[[], object]):
        started = time.perf_counter()
        result = work()
        seconds[phase] = round(time.perf_counter() - started, 1) + seconds.get(phase, 0.0)
        return result

    skills = list(config.skills.names)
    main = _with(config, run_dir=str(out / "selma"), merge__method="delta_mean")
    needs_training = set(arms) - {"base"}
    timed("selma", lambda: run_stages(main, ("prompts", "images", "train", "merge") if needs_training else
                                      ("prompts", "images"), progress=progress))
    run = RunDir(str(out / "selma"))
    ab_mean = out / "merged-ab_mean"
    if "ab_mean" in arms and not (ab_mean / "merge.json").is_file():
        timed("ab_mean", lambda: merge_experts({s: run.path("experts", s) for s in skills}, ab_mean, method="ab_mean"))
    for name in DERIVED_ARMS:
        if name not in arms:
            continue
        wanted = _with(main, run_dir=str(out / name), **({"train__mode": "joint"} if name == "joint" else {}))
        timed(name, lambda: derive_run(run, wanted, name, progress))

    shared = {"base": "base", "delta_mean": "merged", "ab_mean": f"ab_mean={ab_mean}",
              "joint": f"joint={out / 'joint' / 'experts' / 'joint'}"}  # arms scored on every skill
    models = [spec for arm, spec in shared.items() if arm in arms]
    kinds = [skill_kind(s) for s in skills]
    if models:
        timed("eval", lambda: run_eval(_with(main, eval__models=models, eval__world_kinds=kinds), run, progress))
    for skill in skills:
        own = [f"expert-{skill}" if arm == "experts" else f"{arm}-{skill}={out / arm / 'experts' / skill}"
               for arm in PER_SKILL_ARMS
               if arm in arms and (arm == "experts" or (out / arm / "experts" / skill).is_dir())]
        if own:
            timed("eval", lambda: run_eval(_with(main, eval__models=own, eval__world_kinds=[skill_kind(skill)]),
                                           run, progress))
    record = {"config": main.model_dump(mode="json"), "arms": list(arms), "seconds": seconds,
              "machine": _machine(), "training_images": training_image_counts(out, skills, arms)}
    (out / "experiment.json").write_text(json.dumps(record, indent=2) + "\n")
    return write_experiment_report(out, progress)


def training_image_counts(out: Path, skills: list[str], arms) -> dict[str, dict[str, int]]:
    counts = {}
    for name in ("selma", *DERIVED_ARMS):
        folder = out / name
        if name != "joint" and (folder / "run.json").is_file() and (name == "selma" or name in arms):
            stage = RunDir(str(folder)).stage("images")
            counts[name] = {s: stage.get("counts", {}).get(s) for s in skills}
    return counts


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- the report


def arm_model(arm: str, skill: str) -> str:
    """The eval model name under which ``arm`` is scored on ``skill``'s kind."""
    if arm == "experts":
        return f"expert-{skill}"
    if arm in ("filtered", "ground_truth"):
        return f"{arm}-{skill}"
    return "merged" if arm == "delta_mean" else arm


def accuracy_by_kind(run: RunDir, model: str) -> dict[str, dict]:
    """Prompt accuracy per caption kind: mean over prompts (each the mean of its images) ± s.e."""
    if not run.exists("eval", model, "world-images.parquet"):
        return {}
    table = pq.read_table(run.path("eval", model, "world-images.parquet"))
    items = {}
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
        mean = sum(means) / n
        variance = sum((m - mean) ** 2 for m in means) / (n - 1) if n > 1 else 0.0
        result[kind] = {"accuracy": mean, "stderr": math.sqrt(variance / n), "dsg": sum(scores) / n,
                        "prompts": n, "images": sum(len(v) for v in per_item)}
    return result


def experiment_results(out: Path) -> dict:
    record = json.loads((out / "experiment.json").read_text())
    skills = record["config"]["skills"]["names"]
    run = RunDir(str(out / "selma"))
    results: dict[str, dict[str, dict]] = {}
    for arm in record["arms"]:
        for skill in skills:
            kind = skill_kind(skill)
            cell = accuracy_by_kind(run, arm_model(arm, skill)).get(kind)
            if cell:
                results.setdefault(arm, {})[kind] = cell
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
        f"Experts are scored on their own skill; merged and joint adapters on every skill.", "",
        "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm in record["arms"]:
        row = results.get(arm, {})
        lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(_cell(row.get(k), base.get(k)) for k in kinds) + " |")
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
