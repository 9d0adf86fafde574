"""Run directories in a known state, built through selma's own RunDir API, for tests of what
commands do to them (refusals, locks, failures) without running the stages before."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

SKILLS = ["coco", "whoops"]
SKILLS_OVERRIDE = f"skills.names=[{', '.join(SKILLS)}]"


def tiny_config(run_dir, *overrides: str):
    from selma.config import load_config

    return load_config("tiny", [f"run_dir={run_dir}", SKILLS_OVERRIDE, *overrides])


def committed_run(run_dir, stages=("prompts", "images"), *overrides: str, experts: bool = False):
    """A run whose ``stages`` are committed under the tiny config (plus overrides), with a prompts
    shard and, if asked, two random tiny:sd experts. Returns its config."""
    from selma.core.rundir import RunDir
    from selma.pipeline import record_config, stage_hashes

    config = tiny_config(run_dir, *overrides)
    run, hashes = RunDir(str(run_dir)), stage_hashes(config)
    record_config(run, config)
    for skill in SKILLS:
        run.write_table(f"prompts/{skill}/part-0.parquet", pa.table({
            "prompt_id": [f"{skill}-1"], "skill": [skill], "prompt": [f"a {skill} prompt"], "origin": ["seed"],
            "generator": ["template"], "round": [0]}))
    if experts:
        from lora_helpers import write_random_lora

        for seed, skill in enumerate(SKILLS):
            write_random_lora("tiny:sd", Path(run.path("experts", skill)), seed=seed)
    for name in stages:
        run.begin_stage(name, hashes[name])
        run.commit_stage(name, **({"experts": {s: {"loss": 0.1} for s in SKILLS}} if name == "train" else {}))
    return config


def snapshot(folder) -> dict[str, str]:
    """Every file below ``folder`` (the lock file excluded) → a digest of its bytes."""
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def selma(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selma", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
