"""The ``selma`` command line: one subcommand per stage, ``run`` for all, and helpers."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from selma.core.errors import InputError

STAGE_HELP = {
    "prompts": "generate skill-specific prompts with the SELMA in-context loop",
    "images": "draw one image per prompt with the diffusion model (Ray Data)",
    "train": "train one LoRA expert per skill, all at once (Ray Train)",
    "merge": "merge the experts into one multi-skill adapter",
}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default="tiny",
                        help="a preset name (tiny, sd14, sd2, sdxl) or a YAML file (default: tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. images.steps=20 train.max_steps=100")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--run-dir", help="run directory, a path or URI (default: runs/<name>)")
    parser.add_argument("--restart", action="store_true",
                        help="discard this stage's output (and every later stage's) and redo it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selma", description="SELMA on Ray: skill-specific LoRA experts, "
                                     "learned on auto-generated data and merged, for faithful text-to-image models.",
                                     epilog="Exit codes: 0 done, 1 runtime failure, 2 bad input. Add --debug anywhere "
                                            "for a traceback instead of a one-line error.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run every stage: prompts → images → train → merge")
    _add_run_arguments(run)
    run.add_argument("--until", choices=list(STAGE_HELP), default="merge",
                     help="stop after this stage (e.g. --until images to build an image-text dataset)")
    for name, text in STAGE_HELP.items():
        _add_run_arguments(commands.add_parser(name, help=text, description=text))

    serve = commands.add_parser("serve", help="serve a run's models (base, merged, experts) with the OpenAI Images API")
    serve.add_argument("run_dir", help="a finished run directory")
    serve.add_argument("--model", help="the default model: base, merged or expert-<name> (default: serve.model)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("overrides", nargs="*", metavar="key.sub=value")

    evaluate = commands.add_parser(
        "eval", help="score models (base, merged, experts, LoRA folders) on DSG-1K / TIFA and write a comparison report",
        description="Draw each model's images for a benchmark's prompts, answer its questions with a VQA model, "
                    "score, and write eval/<model>/ plus eval/report.md and report.png in the run directory.")
    evaluate.add_argument("run_dir", help="run directory (its run.json's config is used unless --config is given)")
    evaluate.add_argument("--config", "-c", help="a preset or YAML file (default: the run's own config, else tiny)")
    evaluate.add_argument("--models", metavar="M1,M2",
                          help="comma-separated: base, merged, experts, expert-<name> or a LoRA folder, PATH or NAME=PATH "
                               "(default: eval.models)")
    evaluate.add_argument("--benchmark", action="append", choices=["dsg", "tifa", "prompts", "world"],
                          help="repeatable (default: eval.benchmarks)")
    evaluate.add_argument("--limit", type=int, help="a seeded random sample of this many prompts per benchmark")
    evaluate.add_argument("overrides", nargs="*", metavar="key.sub=value",
                          help="config overrides, e.g. eval.dsg_annotations=path/dsg-1k-anns.csv eval.vqa.model=DIR")

    from selma.merge.adapters import MERGE_ADAPTERS_HELP, add_merge_adapters_arguments

    add_merge_adapters_arguments(commands.add_parser(
        "merge-adapters", help="merge LoRA adapter folders without a run directory", description=MERGE_ADAPTERS_HELP))

    export = commands.add_parser("export", help="export a run's data for other tools")
    export_commands = export.add_subparsers(dest="export_command", required=True)
    folder = export_commands.add_parser("imagefolder", help="PNG files + metadata.jsonl (diffusers' training scripts)")
    folder.add_argument("run_dir")
    folder.add_argument("out")
    folder.add_argument("--skill", action="append", help="only this skill (repeatable)")

    from selma.core.expert_steps import LAST

    def step_argument(text: str) -> int | str:
        if text == LAST or (text.isdigit() and int(text) > 0):
            return text if text == LAST else int(text)
        raise argparse.ArgumentTypeError(f"expected a step number or {LAST!r}, got {text!r}")

    experts = commands.add_parser("experts", help="list a run's experts and their checkpoints, or export one step of them")
    experts_commands = experts.add_subparsers(dest="experts_command", required=True)
    experts_list = experts_commands.add_parser(
        "list", help="each expert's exported steps and the loss at each, and the one train.select merges")
    experts_list.add_argument("run_dir")
    experts_export = experts_commands.add_parser(
        "export", help="write each expert's LoRA at one step to OUT/<name>/, a folder plain diffusers loads")
    experts_export.add_argument("run_dir")
    experts_export.add_argument("--step", required=True, type=step_argument,
                                help="a checkpoint's step, or last (each expert's latest)")
    experts_export.add_argument("--expert", action="append", help="only this expert (repeatable; default: all)")
    experts_export.add_argument("--out", required=True, help="output folder")

    config = commands.add_parser("config", help="show or validate a config")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    _add_config_arguments(config_commands.add_parser("show", help="print the fully resolved config as YAML"))
    _add_config_arguments(config_commands.add_parser("validate", help="validate a config; exit 2 if invalid"))

    models = commands.add_parser("models", help="build tiny random models for tests and demos")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    tiny = model_commands.add_parser("tiny", help="save a tiny random pipeline (or LM) with save_pretrained")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--family", choices=["sd", "sdxl", "lm"], default="sd")
    tiny.add_argument("--resolution", type=int, default=64)
    tiny.add_argument("--seed", type=int, default=0)

    world = commands.add_parser("world", help="the shapes world: train its base model, run and report the SELMA experiment")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    train_base = world_commands.add_parser(
        "train-base", help="train the world's text-to-image base model from scratch (under an hour on 2 CPU cores)")
    train_base.add_argument("out", help="output folder (a diffusers pipeline; use it as model: OUT)")
    train_base.add_argument("overrides", nargs="*", metavar="key=value",
                            help="BaseModelConfig fields, e.g. steps=2000 threads=4 (see selma.world.base)")
    ceiling = world_commands.add_parser(
        "ceiling", help="fine-tune every weight on ground-truth renders of one kind: how far perfect data can move "
                        "the model at all (the bound on any LoRA recipe of that many steps)")
    ceiling.add_argument("overrides", nargs="*", metavar="key=value",
                         help="CeilingConfig fields, e.g. kind=binding steps=600 text_encoder=false (see selma.world.ceiling)")
    ceiling.add_argument("--json", metavar="FILE", help="also write the rows and the config to FILE")
    experiment = world_commands.add_parser(
        "experiment", help="base vs SELMA experts, merges, joint LoRA, filtered and ground-truth data; writes OUT/report.md")
    experiment.add_argument("out", help="experiment folder (reruns resume)")
    experiment.add_argument("--config", "-c", default="world", help="a preset or YAML file (default: world)")
    experiment.add_argument("--arms", metavar="A,B", help="comma-separated subset of the arms (default: all)")
    experiment.add_argument("--weak-model", default="world:small",
                            help="the smaller base model that draws the weak-to-strong arm's images (default: world:small)")
    calibrate = world_commands.add_parser(
        "calibrate", help="the ground-truth arm under LoRA recipes vs the base model; writes OUT/calibration.md")
    calibrate.add_argument("out", help="calibration folder (reruns resume)")
    calibrate.add_argument("--config", "-c", default="world", help="a preset or YAML file (default: world)")
    calibrate.add_argument("--recipe", action="append", default=[], metavar="'NAME: key=value key=value'",
                           help="a recipe to try (repeatable; default: selma.experiments.world.DEFAULT_RECIPES)")
    for command in (experiment, calibrate):
        command.add_argument("--truth-seeds", default="0,1", metavar="S,T",
                             help="training seeds of the ground-truth arm (default: 0,1)")
        command.add_argument("overrides", nargs="*", metavar="key.sub=value",
                             help="config overrides, e.g. eval.world_prompts_per_kind=50 train.max_steps=100")
    report = world_commands.add_parser("report", help="rewrite OUT/report.md and report.png from the experiment's scores")
    report.add_argument("out")

    skills = commands.add_parser("skills", help="list or show skills")
    skill_commands = skills.add_subparsers(dest="skills_command", required=True)
    listing = skill_commands.add_parser("list", help="list the built-in skills and those in --file")
    show = skill_commands.add_parser("show", help="show one skill")
    show.add_argument("name")
    for command in (listing, show):
        command.add_argument("--file", action="append", default=[], help="a skill YAML file (repeatable)")
    return parser


def _load_config(args, extra_overrides: tuple[str, ...] = ()):
    from selma.config import load_config

    overrides = list(args.overrides) + list(extra_overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _cmd_stages(args) -> int:
    from selma.pipeline import RUN_STAGE_NAMES, format_summary, run_stages

    config = _load_config(args)
    names = RUN_STAGE_NAMES[: RUN_STAGE_NAMES.index(args.until) + 1] if args.command == "run" else (args.command,)
    summary = run_stages(config, names, restart=args.restart)
    print()
    print(format_summary(summary))
    return 0


def _cmd_config(args) -> int:
    config = _load_config(args)
    if args.config_command == "show":
        print(config.to_yaml(), end="")
    else:
        print(f"{args.config}: valid")
    return 0


def _cmd_models(args) -> int:
    from selma.models.tiny import build_tiny_lm, build_tiny_pipeline

    if args.family == "lm":
        path = build_tiny_lm(args.out, seed=args.seed)
    else:
        path = build_tiny_pipeline(args.out, family=args.family, resolution=args.resolution, seed=args.seed)
    print(f"saved a tiny random {args.family} model to {path}")
    return 0


def _cmd_skills(args) -> int:
    from selma.skills import SkillError, load_registry

    skills = load_registry(args.file)
    if args.skills_command == "list":
        for skill in skills.values():
            print(f"{skill.name:<22} {skill.description}")
        return 0
    if args.name not in skills:
        raise SkillError(f"skills show: unknown skill {args.name!r}; known: {', '.join(skills)}")
    print(json.dumps(skills[args.name].model_dump(), indent=2))
    return 0


def _cmd_serve(args) -> int:
    from selma.serve.run import load_run_config, serve_run_dir

    flags = {"serve.host": args.host, "serve.port": args.port, "serve.model": args.model}
    overrides = [*args.overrides, *(f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None)]
    config, run = load_run_config(args.run_dir, overrides)
    serve_run_dir(config, run)
    return 0


def _cmd_eval(args) -> int:
    from selma.config import load_config
    from selma.core.rundir import RunDir
    from selma.pipeline import run_eval
    from selma.serve.run import load_run_config

    overrides = list(args.overrides)
    if args.models:
        overrides.append(f"eval.models={json.dumps([m.strip() for m in args.models.split(',') if m.strip()])}")
    if args.benchmark:
        overrides.append(f"eval.benchmarks={json.dumps(args.benchmark)}")
    if args.limit is not None:
        overrides.append(f"eval.limit={args.limit}")
    if args.config or not RunDir(args.run_dir).exists("run.json"):
        config = load_config(args.config or "tiny", [*overrides, f"run_dir={args.run_dir}"])
        run = RunDir(args.run_dir)
    else:
        config, run = load_run_config(args.run_dir, overrides)
    result = run_eval(config, run)
    print()
    print(RunDir(run.uri).read_bytes("eval/report.md").decode())
    print(f"report: {result['report']['markdown']}, chart: {result['report']['chart']}")
    return 0


def _cmd_export(args) -> int:
    from selma.core.rundir import RunDir
    from selma.images.export import export_imagefolder

    count = export_imagefolder(RunDir(args.run_dir), args.out, args.skill)
    print(f"exported {count} images to {args.out} (metadata.jsonl: file_name, text)")
    return 0


def _cmd_experts(args) -> int:
    from selma.core.rundir import RunDir
    from selma.train.checkpoints import export_experts, format_listing

    run = RunDir(args.run_dir)
    if args.experts_command == "list":
        print(format_listing(run))
        return 0
    for name, exported in export_experts(run, args.step, args.expert, args.out).items():
        print(f"{name}: step {exported.step} → {os.path.join(args.out, name)}")
    return 0


def _cmd_world(args) -> int:
    from selma.config import load_config
    from selma.core.config import format_validation_error, parse_override
    from selma.core.errors import ConfigError

    if args.world_command in ("train-base", "ceiling"):
        from pydantic import ValidationError

        from selma.world.base import BaseModelConfig, train_base_model
        from selma.world.ceiling import CeilingConfig, finetune_ceiling

        fields = {}
        for text in args.overrides:
            path, value = parse_override(text)
            fields[".".join(path)] = value
        try:
            config = (BaseModelConfig if args.world_command == "train-base" else CeilingConfig).model_validate(fields)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None
        if args.world_command == "train-base":
            train_base_model(args.out, config)
            return 0
        folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise ConfigError(f"--json: cannot write {args.json}: {folder} is not a writable folder")
        rows = finetune_ceiling(config)
        print(f"\n| step | {config.kind} exact % | training loss |\n|---|---|---|")
        for row in rows:
            loss = "" if row["loss"] is None else f"{row['loss']:.4f}"
            print(f"| {row['step']} | {100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f} | {loss} |")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump({"config": config.model_dump(), "rows": rows}, out, indent=2)
        return 0
    from selma.experiments.world import ARMS, run_calibration, run_experiment, write_experiment_report

    if args.world_command == "report":
        try:
            result = write_experiment_report(args.out)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        print()
        print(open(result["markdown"], encoding="utf-8").read())
        return 0
    try:
        truth_seeds = tuple(int(seed) for seed in args.truth_seeds.split(",") if seed.strip())
    except ValueError:
        raise ConfigError(f"--truth-seeds: expected integers separated by commas, got {args.truth_seeds!r}") from None
    if not truth_seeds:
        raise ConfigError("--truth-seeds: name at least one seed")
    config = load_config(args.config, args.overrides)
    if args.world_command == "calibrate":
        recipes = None
        if args.recipe:
            recipes = {}
            for text in args.recipe:
                name, sep, body = text.partition(":")
                if not sep or not name.strip():
                    raise ConfigError(f"--recipe: expected 'NAME: key=value key=value', got {text!r}")
                recipes[name.strip()] = shlex.split(body)
        record = run_calibration(config, args.out, recipes, truth_seeds)
        print()
        print(open(f"{args.out}/calibration.md", encoding="utf-8").read())
        return 0 if any(row["passes"] for row in record["recipes"]) else 1
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else ARMS
    result = run_experiment(config, args.out, arms, truth_seeds=truth_seeds, weak_model=args.weak_model)
    print()
    print(open(result["markdown"], encoding="utf-8").read())
    return 0


def _cmd_merge_adapters(args) -> int:
    from selma.merge.adapters import merge_adapters, merge_summary

    report = merge_adapters(args)
    print(json.dumps(report if args.json else merge_summary(report), indent=2))
    return 0


COMMANDS = {"merge-adapters": _cmd_merge_adapters, "experts": _cmd_experts, "world": _cmd_world, "eval": _cmd_eval, "export": _cmd_export, "config": _cmd_config, "models": _cmd_models, "skills": _cmd_skills, "serve": _cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a runtime failure, 2 bad input (config, files, run directory, arguments),
    130 interrupted. Errors print as ``selma: <field or path>: <reason>``; ``--debug`` (anywhere on
    the line) or ``SELMA_DEBUG=1`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("SELMA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("selma: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except InputError as err:
        if debug:
            raise
        print(f"selma: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        print(f"selma: {type(err).__name__}: {err}\n(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides given after an option (`--limit 5 key=value`) are left over by argparse.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return COMMANDS.get(args.command, _cmd_stages)(args)


if __name__ == "__main__":
    sys.exit(main())
