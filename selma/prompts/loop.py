"""SELMA's in-context prompt generation loop, as published (Ray-free core).

Per skill: ``pool = seeds``; each request shows the skill's instruction and 3 examples sampled
at random from the pool, numbered 1–3, and the LLM continues the list with ~20 more. Each
parsed candidate is rejected if its ROUGE-L F-measure with any pool prompt is above 0.8, and
joins the pool at once otherwise. A skill stops at N accepted prompts.

:class:`SkillLoop` holds one skill's state as numbered rounds of ``requests_per_round``
requests. Round ``r`` samples its examples from the pool as it stood after round
``r - rounds_in_flight`` and completions are filtered strictly in (round, request) order, so
the accepted prompts depend only on the seed and the LLM's answers, never on timing. With
``rounds_in_flight = 1`` (the default) this is the paper's sequential loop; larger values keep
more requests in flight for batch engines. The same object runs in-process
(:func:`run_in_process`) and inside a Ray actor (:mod:`selma.prompts.pipeline`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable

from selma.core.ids import derived_seed, prompt_id
from selma.llm.base import LLMBackend, LLMRequest
from selma.prompts.diversity import DiversityFilter
from selma.prompts.parse import parse_completion
from selma.prompts.usage import Usage


@dataclass
class SkillStats:
    requests: int = 0
    failed_requests: int = 0
    candidates: int = 0
    accepted: int = 0
    rejected_similar: int = 0
    rejected_by_skill: int = 0
    unparseable: int = 0

    def add(self, other: "SkillStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class PromptRow:
    prompt_id: str
    skill: str
    prompt: str
    origin: str  # "seed" | "llm"
    generator: str
    round: int


@dataclass
class Completion:
    """What came back for one request: the text, or the reason there is none."""

    round: int
    index: int
    text: str = ""
    truncated: bool = False
    error: str | None = None
    prompt_tokens: int | None = None  # as the backend reported them; None: not reported
    completion_tokens: int | None = None


class SkillLoop:
    """One skill's loop: hands out each round's requests and filters their completions in order.

    ``chat``: the requests are a chat model's user messages asking for the numbered list, and the
    completions its answers. ``round_usage``: the usage recorded for the written rounds; the
    entries of rounds the loop requests again are replaced.
    """

    def __init__(self, skill, seeds: list[str], written: list[PromptRow], config, generator_name: str,
                 *, chat: bool = False, round_usage: dict[int, Usage] | None = None):
        self.skill = skill
        self.config = config  # selma.config.PromptsConfig
        self.generator_name = generator_name
        self.chat = chat
        written_texts = {row.prompt for row in written}
        self.seed_rows = [PromptRow(prompt_id(skill.name, s), skill.name, s, "seed", "seed", 0)
                          for s in seeds if s not in written_texts]
        llm_rows = [row for row in written if row.origin == "llm"]
        self.pool = list(seeds) + [row.prompt for row in llm_rows]
        self.filter = DiversityFilter(config.rouge_threshold, self.pool)
        self.accepts = skill.acceptor()
        self.accepted = len(llm_rows)
        self.resumed_from = self.accepted
        self.first_round = max((row.round for row in written), default=0) + 1
        self.processed_round = self.first_round - 1
        self._pool_size_after = {self.processed_round: len(self.pool)}
        self._issued: dict[int, int] = {}
        self._pending: dict[int, dict[int, Completion]] = {}
        self.stats = SkillStats()
        self.round_usage = {r: u for r, u in (round_usage or {}).items() if r < self.first_round}
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.skill.name

    @property
    def usage(self) -> Usage:
        """The skill's usage over every run of the stage."""
        return Usage.total(self.round_usage.values())

    @property
    def done(self) -> bool:
        return self.accepted >= self.config.per_skill

    @property
    def out_of_rounds(self) -> bool:
        return not self.done and self.processed_round >= self.config.max_rounds

    @property
    def llm_failing(self) -> bool:
        """A whole round's worth of requests came back as errors and none succeeded."""
        return (not self.done and self.stats.requests >= self.config.requests_per_round
                and self.stats.failed_requests == self.stats.requests)

    @property
    def finished(self) -> bool:
        return self.done or self.out_of_rounds or self.llm_failing

    @property
    def next_unrequested_round(self) -> int:
        return max([self.processed_round, *self._issued]) + 1

    def ready_for(self, round_number: int) -> bool:
        """Whether round ``round_number``'s requests can be built (its example pool is final)."""
        return self.finished or round_number - self.config.rounds_in_flight <= self.processed_round

    def requests(self, round_number: int) -> list[LLMRequest]:
        """Round ``round_number``'s requests; none once the skill is finished or past max_rounds."""
        if round_number in self._issued:
            raise ValueError(f"round {round_number} of skill {self.name!r} was already requested")
        if not self.ready_for(round_number):
            raise ValueError(f"round {round_number} of skill {self.name!r} requested before round "
                             f"{round_number - self.config.rounds_in_flight} was filtered")
        if self.finished or round_number > self.config.max_rounds or round_number < self.first_round:
            self._issued[round_number] = 0
            return []
        cfg = self.config
        visible = self.pool[: self._pool_size_after[max(round_number - cfg.rounds_in_flight, self.first_round - 1)]]
        rng = random.Random(derived_seed(cfg.seed, self.name, round_number))
        requests = []
        for index in range(cfg.requests_per_round):
            examples = rng.sample(visible, min(cfg.examples_per_request, len(visible)))
            requests.append(LLMRequest(
                skill=self.name,
                prompt=self.skill.render_instruction(examples, cfg.candidates_per_request, chat=self.chat),
                seed=derived_seed(cfg.seed, self.name, round_number, index),
                num_candidates=cfg.candidates_per_request,
                first_index=len(examples) + 1,
                round=round_number,
                index=index,
            ))
        self._issued[round_number] = len(requests)
        return requests

    def add(self, completions: Iterable[Completion]) -> list[tuple[int, list[PromptRow]]]:
        """Take completions (any order, any subset); filter every round now complete, in order.

        Returns ``(round, accepted rows)`` for each round filtered by this call.
        """
        for completion in completions:
            expected = self._issued.get(completion.round, 0)
            if not 0 <= completion.index < expected:
                raise ValueError(f"skill {self.name!r}: unexpected completion for round {completion.round} "
                                 f"request {completion.index}")
            self._pending.setdefault(completion.round, {})[completion.index] = completion
        filtered = []
        while True:
            next_round = self.processed_round + 1
            expected = self._issued.get(next_round)
            if expected is None or len(self._pending.get(next_round, {})) < expected:
                return filtered
            answers = self._pending.pop(next_round, {})
            filtered.append((next_round, self._filter_round(next_round, [answers[i] for i in range(expected)])))
            self.processed_round = next_round
            self._pool_size_after[next_round] = len(self.pool)

    def _filter_round(self, round_number: int, completions: list[Completion]) -> list[PromptRow]:
        if completions:
            self.round_usage[round_number] = Usage.of_requests(
                (c.prompt_tokens, c.completion_tokens) for c in completions)
        accepted = []
        for completion in completions:
            self.stats.requests += 1
            if completion.error:
                self.stats.failed_requests += 1
                self.last_error = completion.error
                continue
            candidates, unparseable = parse_completion(completion.text, truncated=completion.truncated,
                                                       answer=self.chat)
            self.stats.unparseable += unparseable
            for text in candidates:
                if self.done:
                    break
                self.stats.candidates += 1
                if self.accepts is not None and not self.accepts(text):
                    self.stats.rejected_by_skill += 1
                    continue
                if not self.filter.offer(text):
                    self.stats.rejected_similar += 1
                    continue
                self.pool.append(text)
                self.accepted += 1
                self.stats.accepted += 1
                accepted.append(PromptRow(prompt_id(self.name, text), self.name, text, "llm",
                                          self.generator_name, round_number))
        return accepted

    def failure(self) -> str | None:
        """Why the skill ended short of ``per_skill`` prompts, or None."""
        if self.llm_failing:
            return (f"skill {self.name!r}: all {self.stats.requests} LLM requests failed, the last with: "
                    f"{self.last_error}")
        if not self.out_of_rounds:
            return None
        reason = (f"skill {self.name!r} stopped after prompts.max_rounds={self.config.max_rounds} rounds with "
                  f"{self.accepted} of {self.config.per_skill} prompts")
        if self.stats.failed_requests:
            return (f"{reason}; {self.stats.failed_requests} of {self.stats.requests} LLM requests failed, "
                    f"the last with: {self.last_error}")
        return f"{reason}; the LLM's output may be unparseable or too repetitive ({self.stats})"


def raise_if_short(failures: Iterable[str | None]) -> None:
    """Raise one error naming every skill that ended short of ``per_skill`` (``SkillLoop.failure()``)."""
    failures = [failure for failure in failures if failure]
    if failures:
        raise RuntimeError("prompt generation fell short: " + "; ".join(failures))


def run_in_process(loops: list[SkillLoop], backend: LLMBackend,
                   on_round: Callable[[SkillLoop, int, list[PromptRow]], None]) -> None:
    """Drive the loops round by round with a local backend (tests, notebooks, the benchmark)."""
    next_round = {loop.name: loop.first_round for loop in loops}
    while not all(loop.finished for loop in loops):
        requests = []
        for loop in loops:
            while not loop.finished and loop.ready_for(next_round[loop.name]):
                requests += loop.requests(next_round[loop.name])
                next_round[loop.name] += 1
        texts = backend.generate(requests) if requests else []
        by_skill: dict[str, list[Completion]] = {}
        for request, text in zip(requests, texts):
            by_skill.setdefault(request.skill, []).append(Completion(request.round, request.index, text or ""))
        for loop in loops:
            for round_number, rows in loop.add(by_skill.get(loop.name, [])):
                on_round(loop, round_number, rows)
    raise_if_short(loop.failure() for loop in loops)
