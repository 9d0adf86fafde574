"""prompts.chat: which models get chat requests, a model without a template refused before any
work, and the transformers backend's chat prompts and token counts (the tiny LM has a template)."""

import json
import shutil
from pathlib import Path

import pytest

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.core.models import resolve_model
from selma.llm.base import LLMRequest
from selma.llm.chat import chat_template_of, chat_token_ids, uses_chat


@pytest.fixture(scope="module")
def lm_without_template(tmp_path_factory):
    """The tiny LM's tokenizer with its chat template taken out (a base model's)."""
    folder = tmp_path_factory.mktemp("plain-lm")
    for path in Path(resolve_model("tiny:lm")).iterdir():
        if path.name != "chat_template.jinja":
            shutil.copy(path, folder / path.name)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    return str(folder)


def _prompts(*overrides):
    return load_config("tiny", list(overrides)).prompts


def test_auto_sends_chat_requests_exactly_to_models_with_a_template(lm_without_template):
    assert chat_template_of("tiny:lm") and chat_template_of(lm_without_template) is None
    assert uses_chat(_prompts("prompts.backend=vllm", "prompts.model=tiny:lm"))
    assert uses_chat(_prompts("prompts.backend=transformers", "prompts.model=tiny:lm", "prompts.chat=true"))
    assert not uses_chat(_prompts("prompts.backend=vllm", f"prompts.model={lm_without_template}"))
    assert not uses_chat(_prompts("prompts.backend=vllm", "prompts.model=tiny:lm", "prompts.chat=false"))
    assert not uses_chat(_prompts())  # template backend
    openai = ["prompts.backend=openai", "prompts.model=m", "prompts.openai.base_url=http://h/v1"]
    assert uses_chat(_prompts(*openai, "prompts.openai.api=chat"))
    assert not uses_chat(_prompts(*openai))


def test_chat_true_on_a_model_without_a_template_is_refused_before_any_work(lm_without_template, tmp_path):
    from selma.pipeline import run_stages

    config = load_config("tiny", ["prompts.backend=transformers", f"prompts.model={lm_without_template}",
                                  "prompts.chat=true", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"prompts.chat: true, but model .* has no chat template"):
        run_stages(config, ("prompts",))
    assert not (tmp_path / "run" / "run.json").exists()


def test_the_transformers_backend_sends_chat_requests_and_counts_their_tokens():
    import torch

    from selma.llm.transformers_backend import TransformersBackend

    torch.set_num_threads(1)
    requests = [LLMRequest("coco", "Write more.\n1. A red dog.\n2. Two cats.", seed=1, num_candidates=2, first_index=3),
                LLMRequest("coco", "Write more, please.\n1. A blue car.", seed=2, num_candidates=2, first_index=2)]
    chat = TransformersBackend("tiny:lm", temperature=1.0, top_p=1.0, max_tokens=16, chat=True)
    plain = TransformersBackend("tiny:lm", temperature=1.0, top_p=1.0, max_tokens=16)
    tokenizer = chat.tokenizer
    chat_ids = [chat_token_ids(tokenizer, r.prompt) for r in requests]
    assert [ids.count(tokenizer.bos_token_id) for ids in chat_ids] == [1, 1]  # the template's BOS, once
    assert tokenizer.decode(chat_ids[0]).endswith("assistant:")
    done = chat.generate_with_usage(requests)
    assert done.prompt_tokens == [len(ids) for ids in chat_ids]
    assert plain.generate_with_usage(requests).prompt_tokens == [len(tokenizer(r.prompt).input_ids) for r in requests]
    assert all(1 <= n <= 16 for n in done.completion_tokens)
    assert all(n == 16 for n, truncated in zip(done.completion_tokens, done.truncated) if truncated)
