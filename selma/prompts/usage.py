"""Token usage and cost of the prompt stage, per skill.

Each backend reports a request's prompt and completion tokens where it can: the ``openai``
backend from the response's ``usage``, ``vllm`` from the engine's input and generated token
counts, ``transformers`` by counting; the ``template`` backend reports none (requests only).

Usage is kept per round, beside the round's prompts, in ``prompts/<skill>/_usage.json``: the
skill's actor writes a round's usage before the round's prompts, so every written round has its
usage recorded. A rerun keeps the usage of the rounds before the one it resumes at and requests the
later rounds again, replacing their entries: nothing recorded is lost or counted twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from selma.core.rundir import RunDir


def usage_file(skill: str) -> str:
    return f"prompts/{skill}/_usage.json"


@dataclass
class Usage:
    """Requests and the tokens they used; a token count is None when no request reported it."""

    requests: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def add(self, other: "Usage") -> None:
        self.requests += other.requests
        self.prompt_tokens = _sum(self.prompt_tokens, other.prompt_tokens)
        self.completion_tokens = _sum(self.completion_tokens, other.completion_tokens)

    @classmethod
    def of_requests(cls, counts: Iterable[tuple[int | None, int | None]]) -> "Usage":
        """The usage of requests given as (prompt_tokens, completion_tokens) pairs."""
        total = cls()
        for prompt_tokens, completion_tokens in counts:
            total.add(cls(1, prompt_tokens, completion_tokens))
        return total

    @classmethod
    def total(cls, parts: Iterable["Usage"]) -> "Usage":
        total = cls()
        for part in parts:
            total.add(part)
        return total

    def cost(self, pricing) -> float | None:
        """What the tokens cost at ``pricing`` (``prompts.pricing``); None without a price or tokens."""
        if pricing is None or (self.prompt_tokens is None and self.completion_tokens is None):
            return None
        return round(((self.prompt_tokens or 0) * pricing.prompt_per_1m
                      + (self.completion_tokens or 0) * pricing.completion_per_1m) / 1e6, 6)

    def record(self, pricing) -> dict:
        """As run.json records it: requests, tokens, and the cost with its currency when priced."""
        cost = self.cost(pricing)
        return {**asdict(self), **({"cost": cost, "currency": pricing.currency} if cost is not None else {})}

    def describe(self, pricing) -> str:
        """e.g. ``12 requests, 3,456 prompt + 7,890 completion tokens, 0.0211 USD``."""
        text = f"{self.requests} request{'s' if self.requests != 1 else ''}"
        if self.prompt_tokens is None and self.completion_tokens is None:
            return f"{text}, no token counts reported"
        text += f", {self.prompt_tokens or 0:,} prompt + {self.completion_tokens or 0:,} completion tokens"
        cost = self.cost(pricing)
        return f"{text}, {cost:.4f} {pricing.currency}" if cost is not None else text


def _sum(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


def read_round_usage(run: RunDir, skill: str) -> dict[int, Usage]:
    """Each written round's usage for ``skill`` (round number → usage); empty for a fresh skill."""
    if not run.exists(usage_file(skill)):
        return {}
    return {int(number): Usage(**entry) for number, entry in run.read_json(usage_file(skill))["rounds"].items()}


def write_round_usage(run: RunDir, skill: str, rounds: dict[int, Usage]) -> None:
    run.write_json(usage_file(skill), {"rounds": {str(number): asdict(usage) for number, usage in sorted(rounds.items())}})


def usage_report(usage: dict[str, Usage], pricing) -> dict:
    """The prompt stage's ``usage`` and ``usage_total`` entries of run.json."""
    return {"usage": {skill: u.record(pricing) for skill, u in usage.items()},
            "usage_total": Usage.total(usage.values()).record(pricing)}
