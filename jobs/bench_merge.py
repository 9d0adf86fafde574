"""Benchmark: merging 5 rank-128 experts of SD-1.5-UNet size on CPU, against a plain concatenation script.

The experts are random LoRAs on every SD-1.5 UNet attention projection (``to_q, to_k, to_v, to_out.0`` of
self- and cross-attention; 128 layers), with the real shapes taken from a ``UNet2DConditionModel`` built on
the meta device from SD-1.5's config (block_out_channels 320/640/1280/1280, cross_attention_dim 768,
attention_head_dim 8, layers_per_block 2; nothing downloaded). They are written with ``write_lora``.

Each case runs in its own fresh process, so its peak RSS (``ru_maxrss``) is its own:

* ``baseline``: the plain script one would write for the exact delta average: ``safetensors`` ``load_file``
  of every expert, ``torch.cat`` of the factors per layer (weight folded into B), ``save_file``; no checks,
  no statistics, every expert fully in memory.
* ``delta_mean``: ``selma.merge.methods.merge_experts`` (layer-by-layer reading, checks, merge.json with
  per-layer norms and the experts' cosine similarities).
* ``ties``: the same with ``method="ties"`` (dense per-layer deltas, density 0.2, stored exactly at full rank).

Prints one JSON object (times, CPU seconds, peak RSS, ratios against the baseline measured in the same run).

    python jobs/bench_merge.py                      # the issue's setting: 5 experts, rank 128
    python jobs/bench_merge.py --scale 8 --cases delta_mean   # a quick smoke run on 1/8-width layers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_SECONDS = 60
TARGET_PEAK_GB = 4


def sd15_attention_shapes(scale: int = 1) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of every attention projection of the SD-1.5 UNet (meta device, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = dict(SD15_UNET)
    if scale > 1:
        config["block_out_channels"] = tuple(c // scale for c in SD15_UNET["block_out_channels"])
        config["cross_attention_dim"] = SD15_UNET["cross_attention_dim"] // scale
        config["norm_num_groups"] = 32 // scale if 32 % scale == 0 else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in TARGETS)
        and (".attn1." in name or ".attn2." in name)
    }


def write_experts(root: Path, shapes: dict[str, tuple[int, int]], count: int, rank: int) -> dict[str, str]:
    import torch

    from selma.merge.lora_io import LoraAdapter, LoraLayer, write_lora

    experts = {}
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        layers = {
            name: LoraLayer(
                A=torch.randn(rank, in_features, generator=generator) * 0.01,
                B=torch.randn(out_features, rank, generator=generator) * 0.01,
                alpha=rank,
            )
            for name, (out_features, in_features) in shapes.items()
        }
        path = root / f"expert{index}"
        write_lora(LoraAdapter(layers=layers, target_modules=list(TARGETS), base_model="sd-1.5-shaped"), path)
        experts[f"expert{index}"] = str(path)
        del layers
    return experts


# ----------------------------------------------------------------------------------------- cases (child processes)


def run_baseline(experts: dict[str, str], out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weight = 1.0 / len(experts)
    loaded = [load_file(str(Path(path) / "pytorch_lora_weights.safetensors")) for path in experts.values()]
    tensors = {}
    for key in sorted(k for k in loaded[0] if k.endswith(".lora.down.weight")):
        up = key.replace(".lora.down.weight", ".lora.up.weight")
        tensors[key] = torch.cat([state[key] for state in loaded], dim=0)
        tensors[up] = torch.cat([state[up] * weight for state in loaded], dim=1)  # alpha = rank: scaling 1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "pytorch_lora_weights.safetensors"))


def run_case(case: str, experts: dict[str, str], out: Path) -> dict:
    # Import everything first (peft, diffusers-free selma.merge, safetensors): timing and RSS are the merge's.
    import_started = time.perf_counter()
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    from selma.merge.methods import merge_experts

    import_seconds = time.perf_counter() - import_started
    rss_before = _rss_now_mb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    extra = {}
    if case == "baseline":
        run_baseline(experts, out)
    elif case == "delta_mean":
        report = merge_experts(experts, out, method="delta_mean")
        extra = {"merged_ranks": report["ranks"]["merged"]}
    elif case == "ties":
        report = merge_experts(experts, out, method="ties", options={"density": 0.2})
        extra = {"merged_ranks": [min(report["ranks"]["merged"]), max(report["ranks"]["merged"])],
                 "exact": report["exact"]}
    elif case == "ties_rank128":
        report = merge_experts(experts, out, method="ties", options={"density": 0.2, "rank": 128})
        extra = {"retained_energy": report["retained_energy"]}
    else:
        raise SystemExit(f"unknown case {case!r}")
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu_before, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_mb": round(rss_before, 1),
        "import_seconds": round(import_seconds, 2),
        "output_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
        **extra,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--scale", type=int, default=1, help="divide every channel width by this (smoke runs)")
    parser.add_argument("--cases", default="baseline,delta_mean,ties",
                        help="comma-separated: baseline, delta_mean, ties, ties_rank128")
    parser.add_argument("--workdir", help="keep the experts and outputs here (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one case, in this fresh process
        spec = json.loads(args.child)
        print(json.dumps(run_case(spec["case"], spec["experts"], Path(spec["out"]))))
        return 0

    with tempfile.TemporaryDirectory(prefix="selma-bench-merge-") as tmp:
        root = Path(args.workdir or tmp)
        started = time.perf_counter()
        shapes = sd15_attention_shapes(args.scale)
        experts = write_experts(root / "experts", shapes, args.experts, args.rank)
        setup_seconds = time.perf_counter() - started
        params = sum(args.rank * (o + i) for o, i in shapes.values())
        results = {}
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            spec = json.dumps({"case": case, "experts": experts, "out": str(root / f"out-{case}")})
            done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])

    report = {
        "setting": {
            "experts": args.experts, "rank": args.rank, "scale": args.scale, "layers": len(shapes),
            "lora_params_per_expert": params, "expert_file_mb": round(params * 4 / 2**20, 1),
            "dense_delta_params": sum(o * i for o, i in shapes.values()),
            "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
            "setup_seconds": round(setup_seconds, 2),
        },
        "results": results,
    }
    base = results.get("baseline")
    if base:
        report["vs_baseline"] = {
            case: {
                "time_ratio": round(r["seconds"] / base["seconds"], 2),
                "cpu_ratio": round(r["cpu_seconds"] / base["cpu_seconds"], 2),
                "peak_rss_ratio": round(r["peak_rss_mb"] / base["peak_rss_mb"], 2),
            }
            for case, r in results.items() if case != "baseline"
        }
    if "delta_mean" in results and args.scale == 1:
        r = results["delta_mean"]
        report["target_delta_mean"] = {
            "seconds": TARGET_SECONDS, "peak_gb": TARGET_PEAK_GB,
            "met": r["seconds"] < TARGET_SECONDS and r["peak_rss_mb"] / 1024 < TARGET_PEAK_GB,
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
