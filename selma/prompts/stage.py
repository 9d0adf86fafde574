"""The prompt stage: SELMA's loop for every skill as one streaming Ray Data pipeline.

::

    round slots ─► BuildRequests ─► LLM (template | transformers | vllm | openai) ─► FilterCompletions ─► prompt rows
                       ▲                                                                   │
                       └──────────────── SkillLoopActor (one per skill: pool + filter) ◄───┘

Each skill's pool and diversity filter live in a :class:`SkillLoopActor`. ``BuildRequests``
asks it for a round's requests (waiting until the rounds they depend on are filtered),
``FilterCompletions`` hands the completions back; the actor filters whole rounds in order,
writes each round's accepted prompts to ``prompts/<skill>/round-XXXXX.parquet`` and returns
them downstream, where ``selma run`` turns them into images in the same pipeline. A rerun
rebuilds each pool from the written rounds and continues.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from dataclasses import asdict

import pyarrow as pa
import ray

from selma.core.progress import Progress
from selma.core.rundir import RunDir
from selma.core.stage import StageBase, StageContext
from selma.llm import complete
from selma.llm.chat import uses_chat
from selma.prompts.loop import Completion, PromptRow, SkillLoop, raise_if_short
from selma.prompts.usage import Usage, read_round_usage, usage_report, write_round_usage
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
REQUEST_SCHEMA = pa.schema(
    [
        ("skill", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("num_candidates", pa.int32()),
        ("first_index", pa.int32()),
        ("round", pa.int32()),
        ("index", pa.int32()),
    ]
)
# Filtering needs only these; the LLM stage's other columns are dropped before it.
COMPLETION_COLUMNS = ["skill", "round", "index", "completion", "truncated", "llm_error", "prompt_tokens",
                      "completion_tokens"]


def rows_to_table(rows: list[PromptRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=PROMPT_SCHEMA)


def read_prompt_rows(run: RunDir, skill: str) -> list[PromptRow]:
    table = run.read_table("prompts", skill)
    if table is None:
        return []
    return [PromptRow(**row) for row in table.select(PROMPT_SCHEMA.names).to_pylist()]


def generator_name(config) -> str:
    return config.prompts.backend if config.prompts.backend == "template" else f"{config.prompts.backend}:{config.prompts.model}"


class SkillLoopActor:
    """A Ray actor (async, 0 CPUs) holding one skill's :class:`SkillLoop` and writing its rounds."""

    def __init__(self, loop: SkillLoop, run_uri: str):
        self.loop = loop
        self.run = RunDir(run_uri)
        self.changed = asyncio.Condition()

    async def requests(self, round_number: int) -> list[dict]:
        async with self.changed:
            await self.changed.wait_for(lambda: self.loop.ready_for(round_number))
        return [asdict(request) for request in self.loop.requests(round_number)]

    async def add(self, completions: list[dict]) -> list[dict]:
        filtered = self.loop.add(Completion(**row) for row in completions)
        if filtered:  # before the rounds' prompts: a written round always has its usage
            write_round_usage(self.run, self.loop.name, self.loop.round_usage)
        accepted = []
        for round_number, rows in filtered:
            if rows:
                self.run.write_table(f"prompts/{self.loop.name}/round-{round_number:05d}.parquet", rows_to_table(rows))
            accepted += [asdict(row) for row in rows]
        if filtered:
            async with self.changed:
                self.changed.notify_all()
        return accepted

    async def status(self) -> dict:
        loop = self.loop
        return {"skill": loop.name, "accepted": loop.accepted, "next_round": loop.next_unrequested_round,
                "finished": loop.finished, "failure": loop.failure(), "stats": asdict(loop.stats),
                "usage": asdict(loop.usage)}


class BuildRequests:
    """Turns each round slot into that round's requests, on one async 0-CPU actor.

    Every slot is in flight at once and waits (without blocking the others) until its skill's
    earlier rounds are filtered: Ray Data does not promise to hand slots over in order, and a
    slot waiting in front of the round it depends on would otherwise stall the pipeline.
    """

    def __init__(self, actors: dict):
        self.actors = actors

    async def __call__(self, slots: pa.Table) -> pa.Table:
        calls = [self.actors[s].requests.remote(r) for s, r in zip(slots["skill"].to_pylist(), slots["round"].to_pylist())]
        rows = [row for answer in await asyncio.gather(*calls) for row in answer]
        return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


class FilterCompletions:
    """Hands completions to their skill's actor; emits the prompts it accepted (0-CPU actor)."""

    def __init__(self, actors: dict):
        self.actors = actors

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(COMPLETION_COLUMNS).to_pylist()
        by_skill: dict[str, list[dict]] = {}
        for row in rows:
            by_skill.setdefault(row["skill"], []).append(
                {"round": row["round"], "index": row["index"], "text": row["completion"] or "",
                 "truncated": bool(row["truncated"]), "error": row["llm_error"] or None,
                 "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"]})
        answers = ray.get([self.actors[skill].add.remote(items) for skill, items in by_skill.items()])
        return pa.Table.from_pylist([row for answer in answers for row in answer], schema=PROMPT_SCHEMA)


class PromptSession:
    """The driver's side of the prompt stage: the skill actors and the pipeline passes over them."""

    def __init__(self, config, run: RunDir, progress=None):
        self.config, self.progress = config, Progress.of(progress)
        self.registry = registry = load_registry(config.skills.files)
        self.chat = uses_chat(config.prompts)
        actor_class = ray.remote(num_cpus=0, max_restarts=0)(SkillLoopActor)
        self.actors = {}
        for name in config.skills.names:
            skill = registry[name]
            loop = SkillLoop(skill, skill.seed_prompts(config.skills.seeds_per_skill), read_prompt_rows(run, name),
                             config.prompts, generator_name(config), chat=self.chat,
                             round_usage=read_round_usage(run, name))
            if loop.seed_rows:
                run.write_table(f"prompts/{name}/round-00000.parquet", rows_to_table(loop.seed_rows))
            if loop.resumed_from:
                self.progress(f"[prompts] {name}: resuming with {loop.resumed_from} prompts already written")
            self.actors[name] = actor_class.remote(loop, run.uri)
        self.accepted = self.progress.counter(
            "prompts", total=config.prompts.per_skill * len(config.skills.names), unit="prompts accepted")

    def statuses(self) -> list[dict]:
        return ray.get([actor.status.remote() for actor in self.actors.values()])

    def pass_dataset(self):
        """One pipeline pass over enough round slots to finish every skill, or None when all are done.

        A pass cannot end early once its skills finish (a Ray Data source is fixed when it
        starts), so it is sized from a conservative acceptance rate; a short pass is followed
        by another.
        """
        cfg = self.config.prompts
        slots = []
        for status in self.statuses():
            if status["finished"]:
                continue
            first = status["next_round"]
            need = cfg.per_skill - status["accepted"]
            rounds = math.ceil(need / (0.2 * cfg.requests_per_round * cfg.candidates_per_request)) + cfg.rounds_in_flight + 1
            rounds = max(0, min(rounds, cfg.max_rounds - first + 1))
            slots += [{"skill": status["skill"], "round": first + offset, "order": offset} for offset in range(rounds)]
        if not slots:
            return None
        slots.sort(key=lambda slot: slot["order"])  # round-major, so every skill advances together

        dataset = ray.data.from_items([{"skill": s["skill"], "round": s["round"]} for s in slots],
                                      override_num_blocks=len(slots))
        dataset = dataset.map_batches(BuildRequests, fn_constructor_args=(self.actors,), batch_size=1,
                                      batch_format="pyarrow", num_cpus=0,
                                      compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=len(slots),
                                                                         max_concurrent_calls_per_actor=len(slots)))
        dataset = complete(dataset, cfg, self.registry, chat=self.chat)
        return dataset.map_batches(FilterCompletions, fn_constructor_args=(self.actors,), batch_size=None,
                                   batch_format="pyarrow", num_cpus=0, compute=ray.data.ActorPoolStrategy(size=1))

    def report(self) -> None:
        statuses = self.statuses()
        self.accepted.update(sum(min(s["accepted"], self.config.prompts.per_skill) for s in statuses))

    def result(self) -> dict:
        statuses = self.statuses()
        pricing = self.config.prompts.pricing
        usage = {s["skill"]: Usage(**s["usage"]) for s in statuses}
        for skill, skill_usage in usage.items():
            self.progress(f"[prompts] {skill}: {skill_usage.describe(pricing)}")
        raise_if_short([s["failure"] for s in statuses])
        return {"counts": {s["skill"]: s["accepted"] for s in statuses},
                "stats": {s["skill"]: s["stats"] for s in statuses}, "chat": self.chat, **usage_report(usage, pricing)}

    def close(self) -> None:
        self.accepted.close()
        for actor in self.actors.values():
            ray.kill(actor)


class PromptStage(StageBase):
    """SELMA's prompt loop for every skill; streams accepted prompts into the image stage."""

    name = "prompts"
    writes = ("prompts",)
    sections = ("skills", "prompts")
    streams_to = "images"

    def preflight(self, config, run: RunDir) -> None:
        uses_chat(config.prompts)  # prompts.chat: true on a model without a chat template is refused here

    def run(self, ctx: StageContext) -> dict:
        return run_prompt_stage(ctx.config, ctx.run, ctx.progress)

    def run_streaming(self, ctx: StageContext, consume) -> tuple[dict, dict | None]:
        session = PromptSession(ctx.config, ctx.run, ctx.progress)
        try:
            consumed = None
            while (dataset := session.pass_dataset()) is not None:
                consumed = _with_progress(session, lambda: consume(dataset))
            return session.result(), consumed
        finally:
            session.close()


def run_prompt_stage(config, run: RunDir, progress=None) -> dict:
    """Generate ``prompts.per_skill`` accepted prompts per skill; resumes from what was written."""
    session = PromptSession(config, run, progress)
    try:
        while (dataset := session.pass_dataset()) is not None:
            _consume(dataset, session)
        return session.result()
    finally:
        session.close()


def _consume(dataset, session: PromptSession) -> None:
    def drain() -> None:
        for _ in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass

    _with_progress(session, drain)


def _with_progress(session: PromptSession, work):
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(session.progress.poll_s):
            session.report()

    reporter = threading.Thread(target=report, name="selma-prompt-progress", daemon=True)
    reporter.start()
    try:
        return work()
    except Exception as err:
        if not type(err).__module__.startswith("ray"):
            raise
        raise _pipeline_error(session.config.prompts, err) from err
    finally:
        stop.set()
        session.report()


def _pipeline_error(config, err: Exception) -> RuntimeError:
    """The failure in one line: Ray's exception chains carry every worker's traceback."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)
              and not re.search(r"UserCodeException|RayTaskError|RaySystemError", line)]
    reason = causes[-1] if causes else (lines[-1] if lines else repr(err))
    if config.backend == "openai":
        path = "chat/completions" if config.openai.api == "chat" else "completions"
        return RuntimeError(f"the LLM endpoint {config.openai.base_url}/{path} failed: {reason[:600]} "
                            "(prompts already accepted are kept; rerun to continue)")
    return RuntimeError(f"the prompt pipeline failed ({config.backend} backend): {reason[:600]} "
                        "(prompts already accepted are kept; rerun to continue)")
