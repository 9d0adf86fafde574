"""The prompt stage on Ray: the streaming loop, the LLM backends over HTTP, streaming into images, resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_server import FakeOpenAI

from selma.config import load_config
from selma.core.rundir import RunDir
from selma.llm.template import TemplateBackend
from selma.pipeline import run_stages
from selma.prompts.loop import SkillLoop, run_in_process
from selma.prompts.stage import read_prompt_rows
from selma.skills import load_registry

pytestmark = pytest.mark.slow


def _in_process(config, requests: dict[str, int] | None = None) -> dict[str, list[str]]:
    """The prompts the in-process loop accepts per skill; ``requests`` gets the requests it sent."""
    registry = load_registry()
    loops = [SkillLoop(registry[n], registry[n].seed_prompts(config.skills.seeds_per_skill), [], config.prompts,
                       "template") for n in config.skills.names]
    accepted: dict[str, list[str]] = {n: [] for n in config.skills.names}
    run_in_process(loops, TemplateBackend(registry), lambda loop, rnd, rows: accepted[loop.name].extend(r.prompt for r in rows))
    if requests is not None:
        requests.update({loop.name: loop.usage.requests for loop in loops})
    return accepted


def _written(run_dir: Path, skills) -> dict[str, list[str]]:
    run = RunDir(str(run_dir))
    return {n: [r.prompt for r in read_prompt_rows(run, n) if r.origin == "llm"] for n in skills}


@pytest.mark.parametrize("in_flight", [1, 3])
def test_the_ray_pipeline_accepts_exactly_what_the_in_process_loop_accepts(ray_local, tmp_path, in_flight):
    config = load_config("tiny", ["prompts.per_skill=30", "prompts.candidates_per_request=4",
                                  "prompts.requests_per_round=2", f"prompts.rounds_in_flight={in_flight}",
                                  "skills.names=[coco, countbench, whoops]", f"run_dir={tmp_path / 'run'}"])
    summary = run_stages(config, ("prompts",))
    assert summary["prompts"] == {"coco": 30, "countbench": 30, "whoops": 30}
    written = _written(tmp_path / "run", config.skills.names)
    assert written == _in_process(config)
    stats = RunDir(str(tmp_path / "run")).manifest()["stages"]["prompts"]["stats"]
    assert all(s["accepted"] == 30 and s["requests"] >= 8 and s["candidates"] >= 30 for s in stats.values())


def _openai_config(server: FakeOpenAI, run_dir: Path, *extra: str):
    return load_config("tiny", ["prompts.backend=openai", "prompts.model=fake-llm", f"prompts.openai.base_url={server.base_url}",
                                "prompts.openai.api_key_env=SELMA_TEST_LLM_KEY", "prompts.openai.retry_wait_s=0.05",
                                "skills.names=[coco]", f"run_dir={run_dir}", *extra])


def test_openai_endpoint_streams_prompts_into_images(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("SELMA_TEST_LLM_KEY", "sk-test")
    run_dir = tmp_path / "run"

    def an_image_is_written() -> bool:
        return any((run_dir / "images").glob("*/*.parquet"))

    # After three answered requests the endpoint holds the rest until an image shard exists: a
    # pipeline that streams draws the first prompts meanwhile; one that waits for every prompt
    # first would only be let go by the timeout.
    with FakeOpenAI(delay_s=0.2, unavailable_first=2, api_key="sk-test", candidates=1, hold_after=3,
                    hold_until=an_image_is_written, hold_timeout_s=90) as server:
        config = _openai_config(server, run_dir, "prompts.per_skill=6", "prompts.candidates_per_request=1",
                                "prompts.requests_per_round=1", "prompts.max_tokens=64", "images.steps=2",
                                "images.batch_size=1")
        summary = run_stages(config, ("prompts", "images"))
    assert summary["prompts"] == {"coco": 6} and summary["images"] == {"coco": 6}
    # 503s were retried with back-off, every request carried the key, the model, and its own seed.
    assert len(server.headers) > len(server.requests) >= 6
    assert all(h.get("Authorization") == "Bearer sk-test" for h in server.headers)
    assert {p["model"] for p in server.requests} == {"fake-llm"}
    assert len({p["seed"] for p in server.requests}) == len(server.requests)
    assert all(p["max_tokens"] == 64 and p["prompt"].rstrip().endswith("4.") for p in server.requests)
    assert server.released_by == "condition", "images should be drawn while prompts are still being generated"


def test_openai_chat_endpoint_records_the_usage_it_answers(ray_local, tmp_path):
    from selma.prompts.usage import Usage

    lines = []
    with FakeOpenAI(candidates=6) as server:
        config = _openai_config(server, tmp_path / "run", "prompts.openai.api=chat", "prompts.per_skill=5",
                                "prompts.pricing={prompt_per_1m: 1.5, completion_per_1m: 2.0}",
                                "prompts.openai.tpm=1000000")
        run_stages(config, ("prompts",), progress=lines.append)
    assert len(_written(tmp_path / "run", ["coco"])["coco"]) == 5
    assert all(p["messages"][0]["role"] == "user" for p in server.requests)
    assert all("numbered list from 4 to 23" in p["messages"][0]["content"] for p in server.requests)
    # What the endpoint reported is what run.json records, priced, and what the stage printed.
    answered = Usage(len(server.usages), sum(u["prompt_tokens"] for u in server.usages),
                     sum(u["completion_tokens"] for u in server.usages))
    entry = RunDir(str(tmp_path / "run")).manifest()["stages"]["prompts"]
    assert entry["usage"]["coco"] == answered.record(config.prompts.pricing) and answered.prompt_tokens > 0
    assert entry["usage"]["coco"]["cost"] == round((answered.prompt_tokens * 1.5 + answered.completion_tokens * 2.0) / 1e6, 6)
    assert entry["usage_total"] == entry["usage"]["coco"] and entry["chat"] is True
    assert f"[prompts] coco: {answered.describe(config.prompts.pricing)}" in lines


def test_an_endpoint_that_refuses_every_request_fails_with_its_reason(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("SELMA_TEST_LLM_KEY", "sk-wrong")
    with FakeOpenAI(api_key="sk-right") as server:
        config = _openai_config(server, tmp_path / "run", "prompts.requests_per_round=2")
        with pytest.raises(RuntimeError, match="all 2 LLM requests failed.*Incorrect API key"):
            run_stages(config, ("prompts",))
    manifest = RunDir(str(tmp_path / "run")).manifest()
    assert manifest["stages"]["prompts"]["status"] == "failed"
    assert "Incorrect API key" in manifest["stages"]["prompts"]["error"]
    assert _written(tmp_path / "run", ["coco"])["coco"] == []


def test_an_unreachable_endpoint_fails_with_a_clear_error(ray_local, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = load_config("tiny", ["prompts.backend=openai", "prompts.model=m", f"prompts.openai.base_url=http://127.0.0.1:{port}/v1",
                                  "prompts.openai.max_retries=1", "prompts.openai.retry_wait_s=0.05",
                                  "skills.names=[coco]", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match=f"LLM endpoint http://127.0.0.1:{port}/v1/completions"):
        run_stages(config, ("prompts",))


def test_sigkill_mid_stage_then_rerun_reaches_exactly_n_per_skill(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["prompts.per_skill=400", "prompts.requests_per_round=2", "prompts.candidates_per_request=10",
                 "skills.names=[coco, whoops]"]
    args = ["--config", "tiny", "--run-dir", str(run_dir), *overrides]
    driver = subprocess.Popen([sys.executable, "-m", "selma", "prompts", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while len(list((run_dir / "prompts").glob("*/round-*.parquet"))) < 8:
        assert driver.poll() is None and time.time() < deadline, "the stage ended before it could be killed"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    partial = _written(run_dir, ["coco", "whoops"])
    assert 0 < sum(map(len, partial.values())) < 800
    result = subprocess.run([sys.executable, "-m", "selma", "prompts", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with" in result.stdout
    written = _written(run_dir, ["coco", "whoops"])
    for skill, texts in written.items():
        assert len(texts) == len(set(texts)) == 400
        assert texts[: len(partial[skill])] == partial[skill]
    # The loop filters whole rounds in order, so the resumed run equals an uninterrupted one, and so
    # do the requests it records: none lost, none counted twice (the template backend counts no tokens).
    uninterrupted_requests = {}
    assert written == _in_process(load_config("tiny", overrides), uninterrupted_requests)
    usage = RunDir(str(run_dir)).manifest()["stages"]["prompts"]["usage"]
    assert usage == {skill: {"requests": uninterrupted_requests[skill], "prompt_tokens": None, "completion_tokens": None}
                     for skill in ("coco", "whoops")}
