"""The ``openai`` backend: any OpenAI-compatible completions or chat endpoint, through
``ray.data.llm``'s ``HttpRequestProcessorConfig`` (requests per second, retries with back-off),
with a tokens-per-minute limit (:mod:`selma.llm.ratelimit`) when ``openai.tpm`` is set. Each
request's token usage is read from the answer's ``usage``.

The key is read from the environment variable ``prompts.openai.api_key_env`` on the driver.
A request the server answers with an error is recorded against its skill; a server that
cannot be reached after the retries fails the stage (what was already written is kept).
"""

from __future__ import annotations

import os

from selma.llm.base import PROCESSOR_MAP_KWARGS, normalize_completions
from selma.llm.ratelimit import TokenLimitedSessions


def request_payload(config, row: dict) -> dict:
    payload = {"model": config.model, "max_tokens": config.max_tokens, "temperature": config.temperature,
               "top_p": config.top_p, **config.sampling_params, "seed": int(row["seed"])}
    if config.openai.api == "chat":
        payload["messages"] = [{"role": "user", "content": row["prompt"]}]
    else:
        payload["prompt"] = row["prompt"]
    return payload


def parse_response(response) -> tuple[str, bool, str | None]:
    """(text, truncated, error) from an OpenAI-style JSON answer."""
    if not isinstance(response, dict):
        return "", False, f"unexpected response: {str(response)[:300]}"
    if response.get("error"):
        error = response["error"]
        return "", False, str(error.get("message", error) if isinstance(error, dict) else error)[:1000]
    try:
        choice = response["choices"][0]
        text = choice.get("text")
        if text is None:
            text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return "", False, f"response without choices: {str(response)[:300]}"
    return str(text or ""), choice.get("finish_reason") == "length", None


def response_usage(response) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from an answer's ``usage``; None where it reports none."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None, None
    counts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return tuple(None if n is None else int(n) for n in counts)


def openai_stage(dataset, config):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    endpoint = config.openai
    path = "chat/completions" if endpoint.api == "chat" else "completions"
    key = os.environ.get(endpoint.api_key_env)
    processor = build_processor(
        HttpRequestProcessorConfig(
            url=f"{endpoint.base_url}/{path}",
            headers={"Authorization": f"Bearer {key}"} if key else None,
            qps=endpoint.qps,
            session_factory=TokenLimitedSessions(endpoint.tpm) if endpoint.tpm else None,
            max_retries=endpoint.max_retries,
            base_retry_wait_time_in_s=endpoint.retry_wait_s,
            batch_size=config.batch_size,
            concurrency=config.resources.workers,
            http_request_stage={"num_cpus": 0},
        ),
        preprocess=lambda row: {**row, "payload": request_payload(config, row)},
        postprocess=_postprocess,
        preprocess_map_kwargs=PROCESSOR_MAP_KWARGS,
        postprocess_map_kwargs=PROCESSOR_MAP_KWARGS,
    )
    return normalize_completions(processor(dataset))


def _postprocess(row: dict) -> dict:
    response = row.get("http_response")
    text, truncated, error = parse_response(response)
    prompt_tokens, completion_tokens = response_usage(response)
    return {**{k: row[k] for k in ("skill", "round", "index")}, "completion": text, "truncated": truncated,
            "llm_error": error, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
