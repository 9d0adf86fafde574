"""The prompt stage: run the SELMA loop for every skill and write ``prompts/<skill>/*.parquet``."""

from __future__ import annotations

import time
from dataclasses import asdict

import pyarrow as pa

from selma.llm import make_backend
from selma.prompts.loop import PromptLoop, PromptRow
from selma.rundir import RunDir
from selma.skills import load_registry

PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("skill", pa.string()),
        ("prompt", pa.string()),
        ("origin", pa.string()),
        ("generator", pa.string()),
        ("round", pa.int32()),
    ]
)


def rows_to_table(rows: list[PromptRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=PROMPT_SCHEMA)


def read_prompt_rows(run: RunDir, skill: str) -> list[PromptRow]:
    table = run.read_table("prompts", skill)
    if table is None:
        return []
    return [PromptRow(**row) for row in table.select(PROMPT_SCHEMA.names).to_pylist()]


def generator_name(config) -> str:
    return config.prompts.backend if config.prompts.backend == "template" else f"{config.prompts.backend}:{config.prompts.model}"


def run_prompt_stage(config, run: RunDir, progress=print) -> dict:
    """Generate ``prompts.per_skill`` accepted prompts per skill; resumes from what was written."""
    registry = load_registry(config.skills.files)
    backend = make_backend(config.prompts, registry)
    loop = PromptLoop(backend, config.prompts, generator_name(config))
    states = []
    for name in config.skills.names:
        skill = registry[name]
        written = read_prompt_rows(run, name)
        state, seed_rows = loop.start_skill(skill, skill.seed_prompts(config.skills.seeds_per_skill), written)
        if seed_rows:
            run.write_table(f"prompts/{name}/round-00000.parquet", rows_to_table(seed_rows))
        if written:
            progress(f"[prompts] {name}: resuming with {state.accepted} prompts already written")
        states.append(state)

    started = time.time()

    def write_round(accepted: dict[str, list[PromptRow]]) -> None:
        for name, rows in accepted.items():
            if rows:
                run.write_table(f"prompts/{name}/round-{rows[0].round:05d}.parquet", rows_to_table(rows))
        done = sum(min(s.accepted, config.prompts.per_skill) for s in states)
        total = config.prompts.per_skill * len(states)
        progress(f"[prompts] {done}/{total} accepted ({time.time() - started:.1f}s)")

    try:
        loop.run(states, write_round)
    finally:
        backend.close()
    stats = {s.skill.name: asdict(s.stats) for s in states}
    counts = {s.skill.name: s.accepted for s in states}
    return {"counts": counts, "stats": stats}

