"""LLM backends for prompt generation, chosen by ``prompts.backend``.

Each backend is a Ray Data stage: :func:`complete` takes a dataset of request rows
(``selma.prompts.stage.REQUEST_SCHEMA``) and adds ``completion``, ``truncated``, ``llm_error``
and the request's ``prompt_tokens`` and ``completion_tokens`` (null where the backend counts
none). ``template`` and ``transformers`` also run in-process through :func:`make_backend`
(tests, notebooks).
"""

from __future__ import annotations

from selma.llm.base import LLMBackend, LLMRequest
from selma.llm.openai_backend import openai_stage
from selma.llm.template import TemplateBackend, template_stage
from selma.llm.transformers_backend import TransformersBackend, transformers_stage
from selma.llm.vllm_backend import vllm_stage

BACKENDS = ("template", "transformers", "vllm", "openai")


def complete(dataset, config, skills: dict, *, chat: bool = False):
    """Append the LLM stage that :class:`~selma.config.PromptsConfig` names to ``dataset``;
    ``chat`` (vllm, transformers): send each request through the model's chat template
    (:func:`selma.llm.chat.uses_chat`); the openai backend follows ``openai.api``."""
    if config.backend == "template":
        return template_stage(dataset, skills)
    if config.backend == "transformers":
        return transformers_stage(dataset, config, chat=chat)
    if config.backend == "vllm":
        return vllm_stage(dataset, config, chat=chat)
    if config.backend == "openai":
        return openai_stage(dataset, config)
    raise ValueError(f"unknown prompts.backend {config.backend!r}; available: {BACKENDS}")


def make_backend(config, skills: dict, *, chat: bool = False) -> LLMBackend:
    """An in-process backend (``template`` or ``transformers``)."""
    if config.backend == "template":
        return TemplateBackend(skills)
    if config.backend == "transformers":
        return TransformersBackend(config.model, temperature=config.temperature, top_p=config.top_p,
                                   max_tokens=config.max_tokens, batch_size=config.batch_size, chat=chat)
    raise ValueError(f"prompts.backend {config.backend!r} runs only inside the Ray pipeline")


__all__ = ["BACKENDS", "LLMBackend", "LLMRequest", "complete", "make_backend"]
