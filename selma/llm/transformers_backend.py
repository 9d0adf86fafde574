"""The ``transformers`` backend: a local causal LM (a path or hub id) sampling completions."""

from __future__ import annotations

from selma.llm.base import LLMBackend, LLMRequest


class TransformersBackend(LLMBackend):
    name = "transformers"

    def __init__(self, model: str, *, temperature: float, top_p: float, max_tokens: int, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from selma.models.tiny import resolve_model

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.batch_size = batch_size

    def generate(self, requests: list[LLMRequest]) -> list[str]:
        import torch

        completions: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            inputs = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True)
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
        return completions
