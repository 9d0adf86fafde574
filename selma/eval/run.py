"""``selma eval``: draw each model's images for a benchmark, answer its questions, score, report.

For every model (``base``, ``merged``, ``expert-<name>``, or a LoRA folder) and benchmark:

1. images: the benchmark's prompts drawn on an actor pool of generators (the image stage's own
   Ray Data path, the LoRA fused in), streamed into ``eval/<model>/images/<benchmark>/``. Image
   ids and seeds depend only on the prompt, so every model draws from the same noise, and a rerun
   draws only what is missing;
2. answers: the images streamed through an actor pool of VQA backends (plus reward scorers), each
   answer mapped to a choice on the actor; the driver adds DSG's dependency rule and writes
   ``eval/<model>/<benchmark>-questions.parquet`` and ``<benchmark>-images.parquet``;
3. ``eval/<model>/summary.json``, then ``eval/summary.json``, ``eval/report.md`` and
   ``eval/report.png`` across every model evaluated in the run directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from selma.core.config import VQAConfig, legacy_section
from selma.core.errors import ConfigError
from selma.core.ids import image_seed
from selma.core.rundir import RunDir, local_folder, new_part_name
from selma.core.stage import StageBase, StageContext
from selma.core.vae import check_vae
from selma.eval.dsg import generate_dsg_questions, load_dsg1k
from selma.eval.questions import (
    QUESTION_SCHEMA,
    is_yes_no,
    prompts_of,
    question_table,
    sample_items,
    score_answers,
    summarize,
)
from selma.eval.report import write_report
from selma.eval.rewards import load_reward_scorer
from selma.eval.tifa import AnswerMapper, load_tifa_prompts, load_tifa_questions
from selma.eval.vqa import vqa_backend_of
from selma.images.export import png_bytes_of
from selma.images.generator import GENERATOR_FIELDS
from selma.images.stage import batched_blocks, check_error_rate, draw_images, image_ids, not_yet_drawn, write_images
from selma.models.tiny import is_tiny_spec
from selma.raylib import init_ray
from selma.world import WorldAccuracyScorer, caption_of, question_rows, sample_scenes

# torch, PIL and the scorers' libraries are imported where used, in the VQA actors.

BENCHMARK_TITLES = {"dsg": "DSG-1K", "tifa": "TIFA v1.0", "prompts": "your prompts (DSG questions)",
                    "world": "shapes world (held-out captions)"}


@dataclass(frozen=True)
class EvalModel:
    name: str  # folder under eval/ and the report's label
    lora: str | None  # a local diffusers-format LoRA folder; None for the base model


def _config_error(field: str, message: str) -> ConfigError:
    return ConfigError(f"eval.{field}: {message}")


def resolve_models(config, run: RunDir) -> list[EvalModel]:
    """The models ``eval.models`` names, each checked to exist."""
    models: list[EvalModel] = []
    for spec in config.eval.models:
        if spec == "base":
            models.append(EvalModel("base", None))
        elif spec == "merged":
            models.append(EvalModel("merged", _run_lora(run, "merged", spec)))
        elif spec == "experts":
            found = [n for n in config.expert_names if run.exists("experts", n, "pytorch_lora_weights.safetensors")]
            if not found:
                raise _config_error("models", f"'experts': {run.uri} has no trained experts yet")
            models += [EvalModel(f"expert-{n}", _run_lora(run, f"experts/{n}", spec)) for n in found]
        elif spec.startswith("expert-"):
            models.append(EvalModel(spec, _run_lora(run, f"experts/{spec[len('expert-'):]}", spec)))
        else:
            label, named, location = spec.partition("=")
            if named and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
                raise _config_error("models", f"{spec!r}: a model name (before '=') takes letters, digits, '_', '.', '-'")
            folder = Path(location if named else spec)
            if not (folder / "pytorch_lora_weights.safetensors").is_file():
                raise _config_error("models", f"{spec!r} is not base, merged, experts, expert-<name>, or a LoRA "
                                              "folder (PATH or NAME=PATH) holding pytorch_lora_weights.safetensors")
            name = label if named else "lora-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name)
            models.append(EvalModel(name, str(folder.resolve())))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise _config_error("models", f"two models share a name: {names}")
    return models


def _run_lora(run: RunDir, relative: str, spec: str) -> str:
    if not run.exists(*relative.split("/"), "pytorch_lora_weights.safetensors"):
        raise _config_error("models", f"{spec!r}: {run.uri_of(*relative.split('/'))} holds no LoRA; "
                                      "train and merge first (`selma run`)")
    # A remote run's adapters stay URIs: each generator actor copies its LoRA locally.
    return run.path(*relative.split("/")) if run.is_local else run.uri_of(*relative.split("/"))


def _exists(path: str | None) -> bool:
    return bool(path) and (is_tiny_spec(path) or Path(path).exists())


def check_eval_config(config, run: RunDir) -> list[EvalModel]:
    """Everything ``selma eval`` needs, checked before any Ray work; returns the models."""
    cfg = config.eval
    needs_questions = []
    for benchmark in cfg.benchmarks:
        if benchmark == "dsg" and not _exists(cfg.dsg_annotations):
            raise _config_error("dsg_annotations", f"benchmark 'dsg' needs DSG-1K's dsg-1k-anns.csv "
                                                   f"(github.com/j-min/DSG); got {cfg.dsg_annotations!r}")
        if benchmark == "tifa":
            if not _exists(cfg.tifa_prompts):
                raise _config_error("tifa_prompts", f"benchmark 'tifa' needs tifa_v1.0_text_inputs.json; got {cfg.tifa_prompts!r}")
            if cfg.tifa_questions and not _exists(cfg.tifa_questions):
                raise _config_error("tifa_questions", f"no file at {cfg.tifa_questions!r}")
            if cfg.tifa_questions and cfg.answer_encoder is None:
                raise _config_error("answer_encoder", "TIFA's multiple-choice questions need a sentence-embedding "
                                                      "model folder to map free-form answers to choices")
            if not cfg.tifa_questions:
                needs_questions.append("tifa")
        if benchmark == "prompts":
            if not _exists(cfg.prompts_file):
                raise _config_error("prompts_file", f"benchmark 'prompts' needs a prompt file; got {cfg.prompts_file!r}")
            needs_questions.append("prompts")
    if needs_questions and cfg.questions is None:
        raise _config_error("questions", f"benchmark(s) {needs_questions} need an LLM to write DSG questions "
                                         "(eval.questions: {backend, model, ...}), or give eval.tifa_questions")
    if cfg.vqa.backend != "world" and not _exists(cfg.vqa.model):
        raise _config_error("vqa.model", f"needs a local VQA checkpoint folder (image-text-to-text, e.g. "
                                         f"InstructBLIP or Llava); got {cfg.vqa.model!r}")
    if cfg.answer_encoder and not _exists(cfg.answer_encoder):
        raise _config_error("answer_encoder", f"no sentence-embedding model at {cfg.answer_encoder!r}")
    for name, weights in cfg.rewards.items():
        if not _exists(weights):
            raise _config_error(f"rewards.{name}", f"no weights at {weights!r}")
    check_vae(config.vae, config.model)
    return resolve_models(config, run)


# --------------------------------------------------------------------------- benchmarks


def load_prompt_file(path: str) -> list[dict]:
    """A .txt (one prompt per line), .jsonl ({"prompt": ...} or {"text": ...}) or .csv with a prompt column."""
    file = Path(path)
    if file.suffix == ".jsonl":
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        texts = [r.get("prompt") or r.get("text") for r in records]
        ids = [r.get("id") or r.get("item_id") for r in records]
    elif file.suffix == ".csv":
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(file)
        column = next((c for c in ("prompt", "text", "caption") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{path}: no prompt, text or caption column")
        texts = table.column(column).to_pylist()
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(texts)
    else:
        texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        ids = [None] * len(texts)
    prompts = []
    for number, (identifier, text) in enumerate(zip(ids, texts), 1):
        if not text:
            raise ValueError(f"{path}: prompt {number} is empty")
        prompts.append({"item_id": str(identifier or f"prompt_{number}"), "prompt": text, "source": file.stem})
    return prompts


def load_benchmark(name: str, config, run: RunDir, progress=print) -> pa.Table:
    """The (sampled) question table of a benchmark; questions an LLM writes are kept in the run."""
    cfg = config.eval
    if name == "dsg":
        return sample_items(load_dsg1k(cfg.dsg_annotations), cfg.limit, cfg.sample_seed)
    if name == "world":
        return question_table(world_question_rows(cfg.world_kinds, cfg.world_prompts_per_kind, cfg.sample_seed))
    if name == "tifa" and cfg.tifa_questions:
        return sample_items(load_tifa_questions(cfg.tifa_questions), cfg.limit, cfg.sample_seed)
    prompts = load_tifa_prompts(cfg.tifa_prompts) if name == "tifa" else load_prompt_file(cfg.prompts_file)
    sampled = {row["item_id"] for row in prompts_of(sample_items(pa.Table.from_pylist(prompts), cfg.limit, cfg.sample_seed))}
    return written_questions(name, [p for p in prompts if p["item_id"] in sampled], config, run, progress)


def world_question_rows(kinds: list[str], per_kind: int, seed: int) -> list[dict]:
    """Questions for held-out shapes-world captions: the test split, which training prompts never come from."""
    prompts = [{"item_id": f"{kind}_{index}", "prompt": caption_of(scene), "source": kind}
               for kind in kinds for index, scene in enumerate(sample_scenes(kind, per_kind, seed, split="test"))]
    return question_rows(prompts)


def written_questions(name: str, prompts: list[dict], config, run: RunDir, progress=print) -> pa.Table:
    """DSG questions for ``prompts``: those written before, plus new ones from eval.questions' LLM."""
    written = run.read_table("eval", "questions", name)
    have = set() if written is None else set(written.column("item_id").to_pylist())
    missing = [p for p in prompts if p["item_id"] not in have]
    if missing:
        init_ray(config.ray)
        progress(f"[eval] {name}: writing DSG questions for {len(missing)} prompts with {config.eval.questions.backend}")
        table, failures = generate_dsg_questions(missing, config.eval.questions, progress=progress)
        if table.num_rows:
            run.write_table(f"eval/questions/{name}/{new_part_name()}", table)
        if failures:
            run.write_table(f"errors/eval/questions/{name}/{new_part_name()}", pa.Table.from_pylist(failures))
            progress(f"[eval] {name}: {len(failures)} prompts got no usable questions; reasons in "
                     f"{run.uri_of('errors', 'eval', 'questions', name)}")
        written = run.read_table("eval", "questions", name)
    if written is None:
        raise RuntimeError(f"no questions could be written for benchmark {name!r}")
    ids = pa.array([p["item_id"] for p in prompts], pa.string())
    return written.filter(pc.is_in(written.column("item_id"), ids)).cast(QUESTION_SCHEMA)


# --------------------------------------------------------------------------- images


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def generation_settings(config):
    """The ``images`` section eval draws with: ``eval.steps`` if set, and long prompts truncated."""
    images = config.images
    # Benchmarks hold prompts longer than a CLIP text encoder takes (DSG-1K's paragraphs): the
    # pipeline truncates them, as in the published evaluations.
    return images.model_copy(update={"steps": config.eval.steps or images.steps, "truncate_prompts": True})


def images_key(config, model: EvalModel, benchmark: str) -> str:
    lora = _file_digest(str(Path(local_folder(model.lora)) / "pytorch_lora_weights.safetensors")) if model.lora else None
    drawn_with = generation_settings(config).model_dump(include=GENERATOR_FIELDS)
    # Keyed under the field's old name, so the images eval drew before the rename are reused.
    drawn_with["truncate_long_prompts"] = drawn_with.pop("truncate_prompts")
    vae = [config.vae] if config.vae else []  # keys of images drawn before the VAE override stay as they were
    return _key(config.model, lora, drawn_with, config.eval.seed, benchmark, *vae)


def planned_eval_images(questions: pa.Table, benchmark: str, images_per_prompt: int, seed: int) -> pa.Table:
    """One row per image: ids and seeds from the benchmark, item and index, the same for every model."""
    rows = []
    for item in prompts_of(questions):
        for index in range(images_per_prompt):
            identifier = hashlib.sha256(f"{benchmark}\x00{item['item_id']}\x00{index}".encode()).hexdigest()[:16]
            rows.append({"image_id": identifier, "prompt_id": item["item_id"], "skill": benchmark,
                         "prompt": item["prompt"], "seed": image_seed(seed, identifier)})
    schema = pa.schema([("image_id", pa.string()), ("prompt_id", pa.string()), ("skill", pa.string()),
                        ("prompt", pa.string()), ("seed", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def draw_eval_images(config, run: RunDir, model: EvalModel, benchmark: str, questions: pa.Table, key: str,
                     progress=print) -> pa.Table:
    """Draw the images still missing for (model, benchmark), whose model and settings ``key``
    (:func:`images_key`) names; returns (image_id, prompt_id, prompt) of every image written,
    raising when more than images.max_error_rate failed."""
    images_dir, errors_dir = f"eval/{model.name}/images", f"errors/eval/{model.name}/{benchmark}"
    stamp = f"eval/{model.name}/images/{benchmark}.json"
    if run.exists(*stamp.split("/")) and run.read_json(stamp).get("key") != key:
        progress(f"[eval] {model.name}/{benchmark}: model or image settings changed, drawing the images again")
        for location in (f"{images_dir}/{benchmark}", errors_dir):
            if run.exists(*location.split("/")):
                run.fs.delete_dir(run.path(location))
    run.write_json(stamp, {"key": key})
    plan = planned_eval_images(questions, benchmark, config.eval.images_per_prompt, config.eval.seed)
    done = image_ids(run, f"{images_dir}/{benchmark}")
    todo = not_yet_drawn(plan, done)
    if todo.num_rows:
        cfg = config.eval
        progress(f"[eval] {model.name}/{benchmark}: drawing {todo.num_rows} images ({len(done)} already drawn)")
        started = time.time()
        dataset = draw_images(ray.data.from_arrow(batched_blocks(todo, cfg.batch_size)), config.model,
                              generation_settings(config), batch_size=cfg.batch_size, resources=cfg.resources,
                              lora=model.lora, vae=config.vae)
        write_images(dataset, run, images_dir, errors_dir)
        progress(f"[eval] {model.name}/{benchmark}: drew {todo.num_rows} images in {time.time() - started:.1f}s")
    written = run.read_table("eval", model.name, "images", benchmark, columns=["image_id", "prompt_id", "prompt"])
    written_ids = set() if written is None else set(written.column("image_id").to_pylist())
    failed_ids = image_ids(run, errors_dir) - written_ids
    check_error_rate(plan.num_rows, len(failed_ids), config.images.max_error_rate, run.uri_of(*errors_dir.split("/")),
                     what=f"images of {model.name}/{benchmark}")
    planned_ids = pa.array(plan.column("image_id").to_pylist(), pa.string())
    return written.filter(pc.is_in(written.column("image_id"), planned_ids))


# --------------------------------------------------------------------------- answers


class AnswerImages:
    """Ray Data callable class: a VQA backend (and reward scorers) per actor; a batch of images in,
    per-image lists of answers, chosen choices and correctness (and rewards) out."""

    def __init__(self, eval_config, questions_by_item: dict[str, list[dict]], num_threads: int | None = None,
                 benchmark: str | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.kind = eval_config.vqa.backend
        self.backend = vqa_backend_of(eval_config.vqa)
        self.scorers = {}
        if eval_config.rewards:

            self.scorers = {name: load_reward_scorer(name, weights) for name, weights in eval_config.rewards.items()}
        if benchmark == "world":  # the primary metric: the image is exactly its caption

            self.scorers["prompt_accuracy"] = WorldAccuracyScorer()
        self.mapper = AnswerMapper(eval_config.answer_encoder)
        self.questions_by_item = questions_by_item

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        images = [Image.open(io.BytesIO(png_bytes_of(r["image"]))).convert("RGB") for r in rows]
        pairs = [(i, q) for i, row in enumerate(rows) for q in self.questions_by_item.get(row["prompt_id"], [])]
        answers, probabilities = self._answer([images[i] for i, _ in pairs], [q for _, q in pairs])
        chosen = self.mapper.map(answers, [q["choices"] for _, q in pairs])
        out = {"image_id": [], "question_ids": [], "vqa_answers": [], "yes_probabilities": [], "chosen": [], "correct": []}
        for index, row in enumerate(rows):
            mine = [k for k, (i, _) in enumerate(pairs) if i == index]
            out["image_id"].append(row["image_id"])
            out["question_ids"].append([pairs[k][1]["question_id"] for k in mine])
            out["vqa_answers"].append([answers[k] for k in mine])
            out["yes_probabilities"].append([probabilities[k] for k in mine])
            out["chosen"].append([chosen[k] for k in mine])
            out["correct"].append([float(chosen[k] == pairs[k][1]["answer"]) for k in mine])
        for name, scorer in self.scorers.items():
            out[f"reward_{name}"] = [float(s) for s in scorer.score(images, [r["prompt"] for r in rows])]
        return pa.table(out)

    def _answer(self, images, questions: list[dict]) -> tuple[list[str], list[float | None]]:
        """Free-form answers, or with ``vqascore`` P(yes): the answer to a yes/no question, and for
        multiple choice the choice whose statement gets the highest P(yes)."""
        if self.kind != "vqascore":
            return self.backend.answer(images, [q["question"] for q in questions]), [None] * len(questions)
        answers: list[str] = [""] * len(questions)
        probabilities: list[float | None] = [None] * len(questions)
        yes_no = [k for k, q in enumerate(questions) if is_yes_no(q["choices"])]
        if yes_no:
            found = self.backend.yes_probability([images[k] for k in yes_no], [questions[k]["question"] for k in yes_no])
            for k, p in zip(yes_no, found):
                probabilities[k], answers[k] = float(p), "yes" if p >= 0.5 else "no"
        answered = set(yes_no)
        choice_pairs = [(k, c) for k, q in enumerate(questions) if k not in answered for c in q["choices"]]
        if choice_pairs:
            found = self.backend.yes_probability(
                [images[k] for k, _ in choice_pairs],
                [f'{questions[k]["question"]} Is the answer "{c}"?' for k, c in choice_pairs])
            best: dict[int, tuple[float, str]] = {}
            for (k, choice), p in zip(choice_pairs, found):
                if k not in best or p > best[k][0]:
                    best[k] = (float(p), choice)
            for k, (p, choice) in best.items():
                probabilities[k], answers[k] = p, choice
        return answers, probabilities


def answers_key(config, images: str, questions: pa.Table, *, legacy: bool = False) -> str:
    """What the answers depend on; not the VQA actors' resources. ``legacy``: the key as written
    before ``resources`` replaced ``eval.vqa``'s compute keys, which it included."""
    cfg = config.eval
    text = json.dumps(questions.select(["item_id", "question_id", "question", "choices", "answer", "parents"]).to_pylist(),
                      sort_keys=True)
    vqa = legacy_section(cfg.vqa.model_dump(), VQAConfig) if legacy else cfg.vqa.model_dump(exclude={"resources"})
    return _key(images, vqa, cfg.rewards, cfg.answer_encoder, hashlib.sha256(text.encode()).hexdigest())


def _read_image_files(batch: pa.Table, run_uri: str) -> pa.Table:
    run = RunDir(run_uri)
    columns = ["image_id", "prompt_id", "prompt", "image"]
    return pa.concat_tables([run.read_parquet(path, columns) for path in batch.column("path").to_pylist()])


def answer_questions(config, run: RunDir, model: EvalModel, benchmark: str, questions: pa.Table,
                     images: pa.Table, progress=print) -> tuple[list[dict], list[dict]]:
    """Per-question rows (with ``correct`` and ``score``) and per-image rows (with rewards)."""
    cfg = config.eval
    by_item: dict[str, list[dict]] = {}
    for row in questions.to_pylist():
        by_item.setdefault(row["item_id"], []).append(row)
    files = run.list_files("eval", model.name, "images", benchmark)
    # Reading is I/O, in 0-CPU tasks: read_parquet's file listing and read tasks each want a CPU,
    # and would starve once the VQA actors hold every CPU.
    dataset = ray.data.from_items([{"path": f} for f in files]).map_batches(
        _read_image_files, fn_kwargs={"run_uri": run.uri}, batch_size=1, batch_format="pyarrow", num_cpus=0)
    answered = dataset.map_batches(
        AnswerImages, fn_constructor_args=(cfg, by_item, cfg.vqa.resources.cpu_threads, benchmark), batch_size=4,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.vqa.resources.workers),
        **cfg.vqa.resources.ray_options())
    started = time.time()
    results = {row["image_id"]: row for row in answered.take_all()}
    progress(f"[eval] {model.name}/{benchmark}: answered {sum(len(r['question_ids']) for r in results.values())} "
             f"questions on {len(results)} images in {time.time() - started:.1f}s ({cfg.vqa.backend}: {cfg.vqa.model})")
    question_rows, image_rows = [], []
    for image in images.to_pylist():
        result = results.get(image["image_id"])
        if result is None:
            continue
        by_id = {q["question_id"]: q for q in by_item[image["prompt_id"]]}
        for k, question_id in enumerate(result["question_ids"]):
            question_rows.append({**by_id[question_id], "image_id": image["image_id"],
                                  "vqa_answer": result["vqa_answers"][k], "yes_probability": result["yes_probabilities"][k],
                                  "chosen": result["chosen"][k], "correct": result["correct"][k]})
        image_rows.append({"image_id": image["image_id"], "item_id": image["prompt_id"], "prompt": image["prompt"],
                           **{k: v for k, v in result.items() if k.startswith("reward_")}})
    question_rows = score_answers(question_rows)
    per_image: dict[str, list[float]] = {}
    for row in question_rows:
        per_image.setdefault(row["image_id"], []).append(row["score"])
    for row in image_rows:
        scores = per_image.get(row["image_id"], [])
        row["score"] = sum(scores) / len(scores) if scores else None
    return question_rows, image_rows


# --------------------------------------------------------------------------- driver


def evaluate_model(config, run: RunDir, model: EvalModel, questions: dict[str, pa.Table], progress=print) -> dict:
    """Images, answers and the summary of one model on every benchmark; skips what is up to date."""
    summary_path = f"eval/{model.name}/summary.json"
    previous = run.read_json(summary_path) if run.exists("eval", model.name, "summary.json") else {}
    summary = {"model": model.name, "lora": model.lora, "base_model": config.model, "benchmarks": {}}
    for benchmark, table in questions.items():
        drawn_key = images_key(config, model, benchmark)  # hashes the LoRA file: once per benchmark
        images = draw_eval_images(config, run, model, benchmark, table, drawn_key, progress)
        key = answers_key(config, drawn_key, table)
        done = previous.get("benchmarks", {}).get(benchmark, {})
        up_to_date = done.get("key") in (key, answers_key(config, drawn_key, table, legacy=True))
        if up_to_date and done.get("images") == images.num_rows:
            progress(f"[eval] {model.name}/{benchmark}: answers up to date, skipping")
            summary["benchmarks"][benchmark] = done
            continue
        question_rows, image_rows = answer_questions(config, run, model, benchmark, table, images, progress)
        run.write_table(f"eval/{model.name}/{benchmark}-questions.parquet", pa.Table.from_pylist(question_rows))
        run.write_table(f"eval/{model.name}/{benchmark}-images.parquet", pa.Table.from_pylist(image_rows))
        result = {"key": key, "images": images.num_rows, **summarize(question_rows)}
        rewards = {c[len("reward_"):]: _mean([r[c] for r in image_rows]) for c in (image_rows[0] if image_rows else {})
                   if c.startswith("reward_")}
        if rewards:
            result["rewards"] = rewards
        summary["benchmarks"][benchmark] = result
        run.write_json(summary_path, summary)
    run.write_json(summary_path, summary)
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class EvalStage(StageBase):
    """Every model of ``eval.models`` on every benchmark, then the comparison report.

    Not chained: images and answers are keyed by what decides them (model, LoRA file, settings,
    questions), so a rerun under another eval config redraws only what changed.
    """

    name = "eval"
    reads = ("experts", "merged")
    writes = ("eval",)
    sections = ("eval",)
    chained = False

    def preflight(self, config, run: RunDir) -> None:
        check_eval_config(config, run)

    def run(self, ctx: StageContext) -> dict:
        config, run, progress = ctx.config, ctx.run, ctx.progress
        models = check_eval_config(config, run)
        questions = {}
        for benchmark in config.eval.benchmarks:
            table = load_benchmark(benchmark, config, run, progress)
            items = len(set(table.column("item_id").to_pylist()))
            progress(f"[eval] {BENCHMARK_TITLES[benchmark]}: {items} prompts, {table.num_rows} questions")
            questions[benchmark] = table
        for model in models:
            evaluate_model(config, run, model, questions, progress)
        report = write_report(run, progress)
        return {"models": [model.name for model in models], "benchmarks": list(questions), "report": report}
