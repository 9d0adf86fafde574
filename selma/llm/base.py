"""What every LLM backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LLMRequest:
    skill: str
    prompt: str
    seed: int
    num_candidates: int
    first_index: int  # the number the model is asked to continue from (examples + 1)


class LLMBackend:
    """Turns a batch of requests into raw completions (one string each, continuing the list)."""

    name = "base"

    def generate(self, requests: list[LLMRequest]) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release engines or connections."""
