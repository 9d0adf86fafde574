"""The ``transformers`` backend: a local causal LM (a path or hub id) sampling completions."""

from __future__ import annotations

from dataclasses import dataclass

from selma.core.models import resolve_model
from selma.llm.base import LLMBackend, LLMRequest, requests_from_batch, with_completions
from selma.llm.chat import chat_token_ids


@dataclass
class Generated:
    """A batch's completions, whether each stopped at ``max_tokens``, and the tokens each used."""

    texts: list[str]
    truncated: list[bool]
    prompt_tokens: list[int]
    completion_tokens: list[int]


class TransformersBackend(LLMBackend):
    """``chat``: each request goes through the model's chat template as a user message."""

    name = "transformers"

    def __init__(self, model: str, *, temperature: float, top_p: float, max_tokens: int, batch_size: int = 8,
                 device: str = "cpu", chat: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.batch_size = batch_size
        self.chat = chat

    def generate(self, requests: list[LLMRequest]) -> list[str]:
        return self.generate_with_usage(requests).texts

    def _inputs(self, prompts: list[str]):
        if not self.chat:
            return self.tokenizer(prompts, return_tensors="pt", padding=True)
        ids = [{"input_ids": chat_token_ids(self.tokenizer, prompt)} for prompt in prompts]
        return self.tokenizer.pad(ids, return_tensors="pt")

    def generate_with_usage(self, requests: list[LLMRequest]) -> Generated:
        """Completions, whether each stopped at ``max_tokens`` (its last line may be cut), and the
        tokens each used: its prompt's, and those it generated up to its end token."""
        import torch

        done = Generated([], [], [], [])
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            inputs = self._inputs([r.prompt for r in batch]).to(self.device)
            torch.manual_seed(batch[0].seed)
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature or None,
                    top_p=self.top_p,
                    max_new_tokens=self.max_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            done.texts.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            eos = self.tokenizer.eos_token_id
            for row in new_tokens.tolist():
                ended = row.index(eos) + 1 if eos in row else None
                done.truncated.append(ended is None and len(row) >= self.max_tokens)
                done.completion_tokens.append(ended or len(row))
            done.prompt_tokens.extend(int(n) for n in inputs["attention_mask"].sum(dim=1))
        return done


class TransformersCompletions:
    """Ray Data callable class: one model per actor."""

    def __init__(self, config, chat: bool = False):
        import torch

        if config.resources.cpu_threads:
            torch.set_num_threads(config.resources.cpu_threads)
        self.backend = TransformersBackend(config.model, temperature=config.temperature, top_p=config.top_p,
                                           max_tokens=config.max_tokens, batch_size=config.batch_size,
                                           device="cuda" if config.resources.gpus else "cpu", chat=chat)

    def __call__(self, batch):
        done = self.backend.generate_with_usage(requests_from_batch(batch))
        return with_completions(batch, done.texts, done.truncated, prompt_tokens=done.prompt_tokens,
                                completion_tokens=done.completion_tokens)


def transformers_stage(dataset, config, *, chat: bool = False):
    """Ray Data stage: a pool of ``resources.workers`` model actors."""
    import ray

    return dataset.map_batches(
        TransformersCompletions, fn_constructor_args=(config, chat), batch_size=config.batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.resources.workers),
        **config.resources.ray_options())
