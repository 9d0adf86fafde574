"""Chat models in the prompt stage (``prompts.chat``): whether each request goes through the
model's chat template, and the token ids of a request that does.

A chat model answers a user message rather than continuing a text, so in chat mode the request
asks for the numbered list (:meth:`selma.skills.Skill.render_instruction` with ``chat``) and the
parser reads the answer's numbered lines only. The template is rendered and tokenized here, once,
without the tokenizer's special tokens: a rendered template already holds them, and an engine that
tokenized the rendered text again would add a second BOS.
"""

from __future__ import annotations

from functools import lru_cache

import pyarrow as pa

from selma.core.errors import ConfigError
from selma.core.models import resolve_model

# transformers is imported where used: loading a config must not import it.


@lru_cache(maxsize=8)
def chat_template_of(model: str) -> str | None:
    """The chat template of ``model``'s tokenizer (a path, hub id or ``tiny:`` spec), or None."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model)).chat_template or None


def uses_chat(config) -> bool:
    """Whether the prompt stage sends chat requests under ``config`` (a ``PromptsConfig``); raises
    ConfigError for ``chat: true`` on a model without a chat template."""
    if config.backend == "openai":
        return config.openai.api == "chat"
    if config.backend not in ("vllm", "transformers") or config.chat is False:
        return False
    template = chat_template_of(config.model)
    if config.chat is True and template is None:
        raise ConfigError(f"prompts.chat: true, but model {config.model!r} has no chat template "
                          "(set prompts.chat to auto or false to send it plain continuation prompts)")
    return template is not None


def chat_token_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt`` as a user message through ``tokenizer``'s chat template, ready for the model's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


class ChatTokens:
    """Ray Data callable class: each request row's ``tokenized_prompt`` through the chat template."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [chat_token_ids(self.tokenizer, prompt) for prompt in batch.column("prompt").to_pylist()]
        return batch.append_column("tokenized_prompt", pa.array(ids, pa.list_(pa.int32())))
