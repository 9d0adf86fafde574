"""The merge stage (combine the run's experts into ``merged/``, a CPU task over adapter files), and
``merge_main``: the same merge over arbitrary adapter folders, without a run directory."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from selma.core.rundir import RunDir, RunDirError


def run_merge_stage(config, run: RunDir, progress=print) -> dict:
    from selma.merge.methods import merge_experts

    names = config.expert_names
    missing = [s for s in names if not run.exists("experts", s)]
    if missing:
        raise RunDirError(f"{run.uri_of('experts')}: no trained expert for skill(s) {missing}; run `selma train` first")
    merge = config.merge
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="selma-merge-") as out:
        experts = {s: stack.enter_context(run.local_copy(f"experts/{s}")) for s in names}
        report = merge_experts(
            experts, Path(out), method=merge.method, weights=merge.weights, normalize=merge.normalize,
            options=merge.options, fuse_into=config.model if merge.fused_pipeline else None,
        )
        run.put_dir(out, "merged")
    fused = " (+ fused pipeline in merged/fused)" if merge.fused_pipeline else ""
    progress(f"[merge] {merge.method} of {len(experts)} experts → {run.uri_of('merged')}{fused}")
    return {
        "method": merge.method,
        "experts": sorted(experts),
        "exact": report["exact"],
        "retained_energy": report["retained_energy"],
        "fused_pipeline": bool(merge.fused_pipeline),
    }


# ----------------------------------------------------------------------------------------- merge-adapters CLI


def build_merge_parser(prog: str = "selma merge-adapters") -> argparse.ArgumentParser:
    from selma.merge.methods import MERGE_METHODS

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Merge LoRA adapter folders (diffusers format) into one adapter, without a run directory. "
        "Writes the merged LoRA and merge.json to --out, and optionally a fused full pipeline to --out/fused.",
    )
    parser.add_argument("experts", nargs="+", metavar="EXPERT_DIR",
                        help="expert LoRA folders, each PATH (named after the folder) or NAME=PATH")
    parser.add_argument("--out", "-o", required=True, help="output folder for the merged LoRA and merge.json")
    parser.add_argument("--method", "-m", default="delta_mean", choices=sorted(MERGE_METHODS),
                        help="merge method (default: delta_mean, the exact weighted sum of deltas)")
    parser.add_argument("--weights", "-w",
                        help="per-expert weights, comma-separated in expert order (0.5,0.5) or by name "
                        "(coco=1,whoops=3); default 1/N")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, repeatable: density=0.5, seed=1, rank=64, majority_sign_method=total")
    parser.add_argument("--no-normalize", action="store_true",
                        help="use the weights as given instead of normalising them to sum 1")
    parser.add_argument("--fuse-into", metavar="MODEL",
                        help="also fuse the merged LoRA into this base pipeline (path, hub id or tiny:sd) and "
                        "save it to OUT/fused")
    parser.add_argument("--fused-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved fused pipeline (fusing itself is done in fp32)")
    parser.add_argument("--json", action="store_true", help="print the whole merge.json instead of a summary")
    return parser


def merge_main(argv: list[str] | None = None) -> int:
    """``selma merge-adapters EXPERT_DIR... --out DIR [--method M] [--weights ...] [--option k=v] [--fuse-into MODEL]``.

    Returns a process exit code: 0 on success, 2 for bad input (the message, on stderr, names the experts).
    """
    from selma.merge.lora_io import LoraFormatError
    from selma.merge.methods import MergeError, merge_experts

    parser = build_merge_parser()
    args = parser.parse_args(argv)
    try:
        experts = _parse_experts(args.experts)
        weights = _parse_weights(args.weights, list(experts))
        options = _parse_options(args.option)
        report = merge_experts(
            experts, Path(args.out), method=args.method, weights=weights, normalize=not args.no_normalize,
            options=options, fuse_into=args.fuse_into, fused_dtype=args.fused_dtype,
        )
    except (MergeError, LoraFormatError) as err:
        print(f"selma: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        summary = {key: report[key] for key in ("method", "options", "weights", "exact", "retained_energy",
                                                 "num_layers", "ranks", "output", "fused_pipeline", "seconds")}
        summary["merged_norm"] = report["delta_norms"]["merged"]["total"]
        print(json.dumps(summary, indent=2))
    return 0


def _parse_experts(specs: list[str]) -> dict[str, str]:
    from selma.merge.methods import MergeError

    experts: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = Path(spec.rstrip("/")).name or spec
        if not name or not path:
            raise MergeError(f"expert {spec!r} is not PATH or NAME=PATH")
        if name in experts:
            raise MergeError(
                f"two experts are named {name!r} ({experts[name]} and {path}); name them with NAME=PATH"
            )
        experts[name] = path
    return experts


def _parse_weights(text: str | None, names: list[str]) -> dict[str, float] | None:
    from selma.merge.methods import MergeError

    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    named = [item for item in items if "=" in item]
    try:
        if named and len(named) != len(items):
            raise MergeError(f"--weights {text!r}: give every weight by name or none")
        if named:
            return {key.strip(): float(value) for key, value in (item.split("=", 1) for item in items)}
        values = [float(item) for item in items]
    except ValueError:
        raise MergeError(f"--weights {text!r}: not numbers (experts: {names})") from None
    if len(values) != len(names):
        raise MergeError(f"--weights gives {len(values)} weights for {len(names)} experts {names}: {text!r}")
    return dict(zip(names, values))


def _parse_options(items: list[str]) -> dict[str, object]:
    import yaml

    from selma.merge.methods import MergeError

    options: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MergeError(f"--option {item!r} is not KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise MergeError(f"--option {item!r}: value is not valid YAML") from None
    return options


if __name__ == "__main__":
    sys.exit(merge_main())
