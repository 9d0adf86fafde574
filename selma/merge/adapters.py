"""``selma merge-adapters``: the merge stage's methods over any LoRA adapter folders, without a run
directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from selma.core.config import parse_override
from selma.core.errors import ConfigError
from selma.merge.methods import MERGE_METHODS, MergeError, merge_experts

MERGE_ADAPTERS_HELP = ("Merge LoRA adapter folders (diffusers format) into one adapter, without a run directory. "
                      "Writes the merged LoRA and merge.json to --out, and optionally a fused full pipeline to "
                      "--out/fused.")


def add_merge_adapters_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``selma merge-adapters`` (added to the CLI's sub-command parser)."""
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


def merge_adapters(args: argparse.Namespace) -> dict:
    """``selma merge-adapters EXPERT_DIR... --out DIR [--method M] [--weights ...] [--option k=v]
    [--fuse-into MODEL]``: the merge report; bad input raises MergeError / LoraFormatError, naming
    the experts."""
    experts = _parse_experts(args.experts)
    return merge_experts(
        experts, Path(args.out), method=args.method, weights=_parse_weights(args.weights, list(experts)),
        normalize=not args.no_normalize, options=_parse_options(args.option), fuse_into=args.fuse_into,
        fused_dtype=args.fused_dtype,
    )


def merge_summary(report: dict) -> dict:
    summary = {key: report[key] for key in ("method", "options", "weights", "exact", "retained_energy",
                                             "num_layers", "ranks", "output", "fused_pipeline", "seconds")}
    summary["merged_norm"] = report["delta_norms"]["merged"]["total"]
    return summary


def _parse_experts(specs: list[str]) -> dict[str, str]:
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
    options: dict[str, object] = {}
    for item in items:
        try:
            path, value = parse_override(item)
        except ConfigError as err:
            raise MergeError(f"--option {item!r}: {err}") from None
        options[".".join(path)] = value
    return options
