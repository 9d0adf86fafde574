"""LLM backends for prompt generation, chosen by ``prompts.backend``."""

from __future__ import annotations

from selma.llm.base import LLMBackend, LLMRequest

BACKENDS = ("template", "transformers")


def make_backend(config, skills: dict) -> LLMBackend:
    """Build the backend a :class:`~selma.config.PromptsConfig` names."""
    if config.backend == "template":
        from selma.llm.template import TemplateBackend

        return TemplateBackend(skills)
    if config.backend == "transformers":
        from selma.llm.transformers_backend import TransformersBackend

        return TransformersBackend(
            config.model, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens
        )
    raise ValueError(f"unknown prompts.backend {config.backend!r}; available: {BACKENDS}")


__all__ = ["BACKENDS", "LLMBackend", "LLMRequest", "make_backend"]
