"""The ``transformers`` backend: a local causal LM (a path or hub id) sampling completions."""

from __future__ import annotations

from selma.core.models import resolve_model
from selma.llm.base import LLMBackend, LLMRequest, requests_from_batch, with_completions


class TransformersBackend(LLMBackend):
    name = "transformers"

    def __init__(self, model: str, *, temperature: float, top_p: float, max_tokens: int, batch_size: int = 8,
                 device: str = "cpu"):
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

    def generate(self, requests: list[LLMRequest]) -> list[str]:
        return self.generate_with_lengths(requests)[0]

    def generate_with_lengths(self, requests: list[LLMRequest]) -> tuple[list[str], list[bool]]:
        """Completions, and whether each stopped at ``max_tokens`` (its last line may be cut)."""
        import torch

        completions: list[str] = []
        truncated: list[bool] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            inputs = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True).to(self.device)
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
            completions.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            eos = self.tokenizer.eos_token_id
            truncated.extend(bool(len(row) >= self.max_tokens and eos not in row.tolist()) for row in new_tokens)
        return completions, truncated


class TransformersCompletions:
    """Ray Data callable class: one model per actor."""

    def __init__(self, config):
        import torch

        if config.resources.cpu_threads:
            torch.set_num_threads(config.resources.cpu_threads)
        self.backend = TransformersBackend(config.model, temperature=config.temperature, top_p=config.top_p,
                                           max_tokens=config.max_tokens, batch_size=config.batch_size,
                                           device="cuda" if config.resources.gpus else "cpu")

    def __call__(self, batch):
        texts, truncated = self.backend.generate_with_lengths(requests_from_batch(batch))
        return with_completions(batch, texts, truncated)


def transformers_stage(dataset, config):
    """Ray Data stage: a pool of ``resources.workers`` model actors."""
    import ray

    return dataset.map_batches(
        TransformersCompletions, fn_constructor_args=(config,), batch_size=config.batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.resources.workers),
        **config.resources.ray_options())
