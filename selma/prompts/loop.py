"""SELMA's in-context prompt generation loop, as published (Ray-free core).

Per skill: ``pool = seeds``; each request shows the skill's instruction and 3 examples sampled
at random from the pool, numbered 1–3, and the LLM continues the list with ~20 more. Each
parsed candidate is rejected if its ROUGE-L F-measure with any pool prompt is above 0.8, and
joins the pool at once otherwise. A skill stops at N accepted prompts.

All skills advance together, one round at a time, so a batch backend (vLLM, an HTTP endpoint)
sees every skill's requests in one call. Every round's accepted prompts are handed to
``on_round`` (the stage writes them as one Parquet file), so progress survives a crash and a
restart rebuilds each pool from what was written.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable

from selma.llm.base import LLMBackend, LLMRequest
from selma.prompts.diversity import DiversityFilter
from selma.prompts.parse import parse_completion


def prompt_id(skill: str, text: str) -> str:
    return hashlib.sha256(f"{skill}\x00{text}".encode()).hexdigest()[:16]


def derived_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class SkillStats:
    requests: int = 0
    candidates: int = 0
    accepted: int = 0
    rejected_similar: int = 0
    unparseable: int = 0

    def add(self, other: "SkillStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SkillState:
    skill: object  # selma.skills.Skill
    pool: list[str]
    filter: DiversityFilter
    accepted: int
    next_round: int
    stats: SkillStats = field(default_factory=SkillStats)


@dataclass
class PromptRow:
    prompt_id: str
    skill: str
    prompt: str
    origin: str  # "seed" | "llm"
    generator: str
    round: int


class PromptLoop:
    def __init__(self, backend: LLMBackend, config, generator_name: str):
        self.backend = backend
        self.config = config  # selma.config.PromptsConfig
        self.generator_name = generator_name

    def start_skill(self, skill, seeds: list[str], written: list[PromptRow]) -> tuple[SkillState, list[PromptRow]]:
        """A skill's state from its seeds and the rows already written; returns the seed rows still to write."""
        written_texts = {row.prompt for row in written}
        new_seed_rows = [
            PromptRow(prompt_id(skill.name, s), skill.name, s, "seed", "seed", 0)
            for s in seeds if s not in written_texts
        ]
        llm_rows = [row for row in written if row.origin == "llm"]
        pool = list(seeds) + [row.prompt for row in llm_rows]
        state = SkillState(
            skill=skill,
            pool=pool,
            filter=DiversityFilter(self.config.rouge_threshold, pool),
            accepted=len(llm_rows),
            next_round=max((row.round for row in written), default=0) + 1,
        )
        return state, new_seed_rows

    def _requests(self, state: SkillState) -> list[LLMRequest]:
        cfg = self.config
        name = state.skill.name
        rng = random.Random(derived_seed(cfg.seed, name, state.next_round))
        requests = []
        for index in range(cfg.requests_per_round):
            examples = rng.sample(state.pool, min(cfg.examples_per_request, len(state.pool)))
            requests.append(
                LLMRequest(
                    skill=name,
                    prompt=state.skill.render_instruction(examples, cfg.candidates_per_request),
                    seed=derived_seed(cfg.seed, name, state.next_round, index),
                    num_candidates=cfg.candidates_per_request,
                    first_index=len(examples) + 1,
                )
            )
        return requests

    def run_round(self, states: list[SkillState]) -> dict[str, list[PromptRow]]:
        """One request batch for every unfinished skill; returns the rows accepted per skill."""
        active = [s for s in states if s.accepted < self.config.per_skill]
        requests = [r for state in active for r in self._requests(state)]
        completions = self.backend.generate(requests) if requests else []
        by_skill: dict[str, list[PromptRow]] = {s.skill.name: [] for s in active}
        states_by_name = {s.skill.name: s for s in active}
        for request, completion in zip(requests, completions):
            state = states_by_name[request.skill]
            state.stats.requests += 1
            candidates, unparseable = parse_completion(completion or "")
            state.stats.unparseable += unparseable
            for text in candidates:
                if state.accepted >= self.config.per_skill:
                    break
                state.stats.candidates += 1
                if not state.filter.offer(text):
                    state.stats.rejected_similar += 1
                    continue
                state.pool.append(text)
                state.accepted += 1
                state.stats.accepted += 1
                by_skill[request.skill].append(
                    PromptRow(prompt_id(request.skill, text), request.skill, text, "llm",
                              self.generator_name, state.next_round)
                )
        for state in active:
            state.next_round += 1
        return by_skill

    def run(self, states: list[SkillState], on_round: Callable[[dict[str, list[PromptRow]]], None]) -> None:
        for _ in range(self.config.max_rounds):
            if all(s.accepted >= self.config.per_skill for s in states):
                return
            on_round(self.run_round(states))
        unfinished = {s.skill.name: s.accepted for s in states if s.accepted < self.config.per_skill}
        if unfinished:
            raise RuntimeError(
                f"prompt generation stopped after prompts.max_rounds={self.config.max_rounds} rounds "
                f"with too few accepted prompts: {unfinished} (of {self.config.per_skill}); "
                "the LLM's output may be unparseable or too repetitive"
            )
