"""What every LLM backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class LLMRequest:
    skill: str
    prompt: str
    seed: int
    num_candidates: int
    first_index: int  # the number the model is asked to continue from (examples + 1)
    round: int = 0
    index: int = 0  # position within its round


class LLMBackend:
    """Turns a batch of requests into raw completions (one string each, continuing the list)."""

    name = "base"

    def generate(self, requests: list[LLMRequest]) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release engines or connections."""


def requests_from_batch(batch) -> list[LLMRequest]:
    """The requests in a pyarrow batch of request rows."""
    names = LLMRequest.__dataclass_fields__
    return [LLMRequest(**{k: v for k, v in row.items() if k in names}) for row in batch.to_pylist()]


def with_completions(batch, texts: list[str], truncated: list[bool] | None = None,
                     errors: list[str | None] | None = None, prompt_tokens: list[int] | None = None,
                     completion_tokens: list[int] | None = None):
    """``batch`` plus the ``completion``, ``truncated``, ``llm_error`` and token count columns
    (null where the backend counts no tokens)."""
    n = batch.num_rows
    return (batch.append_column("completion", pa.array(texts, pa.string()))
            .append_column("truncated", pa.array(truncated or [False] * n, pa.bool_()))
            .append_column("llm_error", pa.array(errors or [None] * n, pa.string()))
            .append_column("prompt_tokens", pa.array(prompt_tokens or [None] * n, pa.int64()))
            .append_column("completion_tokens", pa.array(completion_tokens or [None] * n, pa.int64())))


# ray.data.llm's pre/postprocess maps and HTTP clients are light: reserving CPUs for them
# would starve the engines and image generators they run beside (and can stall the pipeline).
PROCESSOR_MAP_KWARGS = {"num_cpus": 0}


def _normalize_batch(batch):
    names = set(batch.column_names)
    n = batch.num_rows

    def column(name, default, type_):
        return batch.column(name).cast(type_) if name in names else pa.array([default] * n, type_)

    errors = column("llm_error", None, pa.string())
    if "__inference_error__" in names:  # rows a processor gave up on skip its postprocess
        engine = batch.column("__inference_error__").to_pylist()
        errors = pa.array([e or (x or None) for e, x in zip(errors.to_pylist(), engine)], pa.string())
    return pa.table({"skill": batch.column("skill"), "round": batch.column("round").cast(pa.int32()),
                     "index": batch.column("index").cast(pa.int32()),
                     "completion": column("completion", "", pa.string()),
                     "truncated": column("truncated", False, pa.bool_()), "llm_error": errors,
                     "prompt_tokens": column("prompt_tokens", None, pa.int64()),
                     "completion_tokens": column("completion_tokens", None, pa.int64())})


def normalize_completions(dataset):
    """The processor's output reduced to the completion columns, error rows included."""
    return dataset.map_batches(_normalize_batch, batch_format="pyarrow", batch_size=None, num_cpus=0)
