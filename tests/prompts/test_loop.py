import pytest

from selma.config import load_config
from selma.llm.base import LLMRequest
from selma.llm.template import TemplateBackend
from selma.prompts.diversity import rouge_l
from selma.prompts.loop import Completion, SkillLoop, run_in_process
from selma.skills import load_registry


def _loops(config, written=None, backend_name="template"):
    registry = load_registry()
    return [SkillLoop(registry[n], registry[n].seed_prompts(config.skills.seeds_per_skill),
                      (written or {}).get(n, []), config.prompts, backend_name) for n in config.skills.names]


def _run(config, written=None, backend=None):
    loops = _loops(config, written)
    rows = [row for loop in loops for row in loop.seed_rows]
    run_in_process(loops, backend or TemplateBackend(load_registry()), lambda loop, rnd, accepted: rows.extend(accepted))
    return loops, rows


def test_every_skill_reaches_n_diverse_prompts_reproducibly():
    config = load_config("tiny", ["prompts.per_skill=25"])
    loops, rows = _run(config)
    llm = [r for r in rows if r.origin == "llm"]
    for name in config.skills.names:
        texts = [r.prompt for r in llm if r.skill == name]
        assert len(texts) == 25
        assert len({r.prompt_id for r in llm if r.skill == name}) == 25
        pool = [r.prompt for r in rows if r.skill == name]
        for text in texts[:10]:
            assert all(rouge_l(other, text) <= 0.8 for other in pool if other != text)
    assert all(loop.stats.accepted == 25 and loop.stats.requests >= 1 for loop in loops)
    assert [r.prompt for r in _run(config)[1]] == [r.prompt for r in rows]
    countbench = [r.prompt.lower() for r in llm if r.skill == "countbench"]
    assert not any(word in text.split() for text in countbench for word in ("four", "five", "six"))


def test_a_different_seed_gives_different_prompts():
    first = _run(load_config("tiny", ["prompts.per_skill=10"]))[1]
    second = _run(load_config("tiny", ["prompts.per_skill=10", "prompts.seed=1"]))[1]
    assert {r.prompt for r in first if r.origin == "llm"} != {r.prompt for r in second if r.origin == "llm"}


def test_requests_show_three_examples_from_the_pool_and_the_skill_rules():
    config = load_config("tiny")
    registry = load_registry()
    skill = registry["countbench"]
    loop = SkillLoop(skill, skill.seed_prompts(3), [], config.prompts, "template")
    request = loop.requests(1)[0].prompt
    assert "never larger than 3" in request
    assert "Create 20 more diverse image descriptions" in request
    assert request.rstrip().endswith("4.")
    assert sum(seed in request for seed in skill.seed_prompts(3)) == 3


def test_rounds_wait_for_the_rounds_they_sample_from_and_filter_in_order():
    config = load_config("tiny", ["prompts.per_skill=500", "prompts.requests_per_round=2",
                                  "prompts.rounds_in_flight=2", "skills.names=[coco]"])
    registry = load_registry()
    loop = _loops(config)[0]
    backend = TemplateBackend(registry)
    first, second = loop.requests(1), loop.requests(2)
    assert not loop.ready_for(3)
    with pytest.raises(ValueError, match="before round 1 was filtered"):
        loop.requests(3)
    answers = {(r.round, r.index): text for r, text in zip(first + second, backend.generate(first + second))}
    # Round 2 arrives first: nothing can be filtered until round 1 is complete.
    assert loop.add([Completion(2, i, answers[(2, i)]) for i in range(2)]) == []
    assert loop.add([Completion(1, 1, answers[(1, 1)])]) == []
    filtered = loop.add([Completion(1, 0, answers[(1, 0)])])
    assert [round_number for round_number, _ in filtered] == [1, 2]
    assert loop.ready_for(3) and loop.ready_for(4) and not loop.ready_for(5)
    # The same answers in order give the same prompts.
    in_order = _loops(config)[0]
    in_order.requests(1), in_order.requests(2)
    expected = in_order.add([Completion(r, i, answers[(r, i)]) for r in (1, 2) for i in range(2)])
    assert [[row.prompt for row in rows] for _, rows in filtered] == [[row.prompt for row in rows] for _, rows in expected]


def test_resume_from_written_rows_finishes_without_duplicates():
    config = load_config("tiny", ["prompts.per_skill=20", "skills.names=[coco, whoops]"])
    _, full = _run(config)
    partial = {}
    for name in ("coco", "whoops"):
        rows = [r for r in full if r.skill == name]
        first_round = [r for r in rows if r.round <= 1]
        partial[name] = first_round  # the seeds and round 1, as a crash after round 1 leaves them
    _, rest = _run(config, partial)
    for name in ("coco", "whoops"):
        combined = partial[name] + [r for r in rest if r.skill == name]
        llm = [r.prompt_id for r in combined if r.origin == "llm"]
        assert len(llm) == 20 and len(set(llm)) == 20
        assert not [r for r in rest if r.skill == name and r.origin == "seed"]
        # Resuming after a whole round reproduces the uninterrupted run exactly.
        assert [r.prompt for r in combined] == [r.prompt for r in full if r.skill == name]


def test_a_backend_that_returns_garbage_gives_a_clear_error():
    config = load_config("tiny", ["prompts.max_rounds=3", "skills.names=[coco]"])

    class Garbage:
        def generate(self, requests):
            return ["\x00\x00 ###"] * len(requests)

    loops = _loops(config, backend_name="garbage")
    with pytest.raises(RuntimeError, match="max_rounds=3"):
        run_in_process(loops, Garbage(), lambda loop, rnd, rows: None)
    assert loops[0].stats.unparseable >= 3 and loops[0].accepted == 0


def test_a_failing_llm_stops_after_one_round_with_its_error():
    config = load_config("tiny", ["prompts.requests_per_round=2", "skills.names=[coco]"])
    loop = _loops(config)[0]
    loop.requests(1)
    loop.add([Completion(1, i, error="HTTP 401: invalid api key") for i in range(2)])
    assert loop.finished and not loop.done
    assert "all 2 LLM requests failed" in loop.failure() and "invalid api key" in loop.failure()


def test_truncated_completions_lose_only_their_last_line():
    config = load_config("tiny", ["skills.names=[coco]", "prompts.per_skill=5"])
    loop = _loops(config)[0]
    loop.requests(1)
    text = " A red kite above a quiet beach today\n5. Two dogs chasing a ball in a park\n6. A tall lamp next to"
    (_, rows), = loop.add([Completion(1, 0, text, truncated=True)])
    assert [r.prompt for r in rows] == ["A red kite above a quiet beach today", "Two dogs chasing a ball in a park"]
    assert loop.stats.unparseable == 1


# One seed, then three candidates: ROUGE-L with the seed 0.7, 0.0 and 0.84 (0.53 with the first).
THRESHOLD_SEED = "a red bus parked next to a tall brick building"
THRESHOLD_CANDIDATES = ["a red bus parked next to a small wooden house", "three penguins juggling oranges on an iceberg",
                        "a red bus parked beside a tall brick building"]


@pytest.mark.parametrize("threshold, kept", [
    (0.3, [1]),  # 0.3 rejects the 0.7 candidate the paper's 0.8 keeps
    (0.8, [0, 1]),
    (0.9, [0, 1, 2]),  # 0.9 keeps the 0.84 candidate the paper's 0.8 rejects
])
def test_the_loop_filters_with_the_configured_rouge_threshold(threshold, kept):
    config = load_config("tiny", [f"prompts.rouge_threshold={threshold}", "skills.names=[coco]",
                                  "prompts.per_skill=100"])
    assert config.prompts.rouge_threshold == threshold
    scores = [rouge_l(THRESHOLD_SEED, c) for c in THRESHOLD_CANDIDATES]
    assert scores[0] == pytest.approx(0.7) and scores[1] == 0 and 0.8 < scores[2] < 0.9
    loop = SkillLoop(load_registry()["coco"], [THRESHOLD_SEED], [], config.prompts, "scripted")
    (request,) = loop.requests(1)
    completion = "\n".join([THRESHOLD_CANDIDATES[0]] + [f"{request.first_index + i}. {text}"
                                                        for i, text in enumerate(THRESHOLD_CANDIDATES[1:], 1)])
    (_, rows), = loop.add([Completion(1, 0, completion)])
    assert [row.prompt for row in rows] == [THRESHOLD_CANDIDATES[i] for i in kept]
    assert loop.stats.candidates == 3 and loop.stats.rejected_similar == 3 - len(kept)
    assert loop.pool == [THRESHOLD_SEED] + [THRESHOLD_CANDIDATES[i] for i in kept]


def test_chat_requests_ask_for_the_numbered_list_and_only_its_items_are_taken():
    config = load_config("tiny", ["skills.names=[coco]", "prompts.per_skill=50", "prompts.requests_per_round=1"])
    skill = load_registry()["coco"]
    loop = SkillLoop(skill, skill.seed_prompts(3), [], config.prompts, "chat-llm", chat=True)
    (request,) = loop.requests(1)
    assert not request.prompt.rstrip().endswith("4.")
    assert request.prompt.endswith("as a numbered list from 4 to 23, one description per line.")
    assert "\n3. " in request.prompt and sum(seed in request.prompt for seed in skill.seed_prompts(3)) == 3
    answer = ("Sure, here are some new descriptions for you to use\n4. A red kite above a quiet beach.\n"
              "5. Two dogs chasing a ball in a park.\nEnjoy these image descriptions!")
    (_, rows), = loop.add([Completion(1, 0, answer)])
    assert [r.prompt for r in rows] == ["A red kite above a quiet beach.", "Two dogs chasing a ball in a park."]
    assert loop.stats.unparseable == 2


def test_usage_is_kept_per_round_and_a_resumed_loop_replaces_the_rounds_it_redoes():
    from selma.prompts.usage import Usage

    config = load_config("tiny", ["skills.names=[coco]", "prompts.per_skill=500", "prompts.requests_per_round=2"])
    registry = load_registry()
    backend = TemplateBackend(registry)
    loop = _loops(config)[0]
    written = list(loop.seed_rows)
    for round_number, tokens in ((1, (10, 20)), (2, (11, 21)), (3, (None, None))):
        requests = loop.requests(round_number)
        texts = backend.generate(requests)
        completions = [Completion(round_number, r.index, t, prompt_tokens=tokens[0], completion_tokens=tokens[1])
                       for r, t in zip(requests, texts)]
        if round_number == 3:  # a request that failed reports no tokens
            completions[1] = Completion(3, 1, error="HTTP 500")
        for _, rows in loop.add(completions):
            if round_number < 3:  # round 3's prompts were lost in a crash; its usage was written first
                written += rows
    assert loop.round_usage == {1: Usage(2, 20, 40), 2: Usage(2, 22, 42), 3: Usage(2, None, None)}
    assert loop.usage == Usage(6, 42, 82)
    resumed = SkillLoop(registry["coco"], registry["coco"].seed_prompts(3), written, config.prompts, "template",
                        round_usage=loop.round_usage)
    assert resumed.first_round == 3 and resumed.usage == Usage(4, 42, 82)
    requests = resumed.requests(3)
    resumed.add([Completion(3, r.index, t, prompt_tokens=5, completion_tokens=6)
                 for r, t in zip(requests, backend.generate(requests))])
    assert resumed.round_usage[3] == Usage(2, 10, 12) and resumed.usage == Usage(6, 52, 94)


def test_the_skill_actor_writes_a_rounds_usage_before_its_prompts(tmp_path, monkeypatch):
    import asyncio

    from selma.core.rundir import RunDir
    from selma.prompts.stage import SkillLoopActor
    from selma.prompts.usage import Usage, read_round_usage, usage_file

    config = load_config("tiny", ["skills.names=[coco]", "prompts.per_skill=500", "prompts.requests_per_round=2"])
    loop = _loops(config)[0]
    run = RunDir(str(tmp_path / "run"))
    actor = SkillLoopActor(loop, run.uri)
    order = []
    write_json, write_table = RunDir.write_json, RunDir.write_table
    monkeypatch.setattr(RunDir, "write_json", lambda self, rel, obj: (order.append(rel), write_json(self, rel, obj)))
    monkeypatch.setattr(RunDir, "write_table", lambda self, rel, t: (order.append(rel), write_table(self, rel, t)))
    requests = [LLMRequest(**row) for row in asyncio.run(actor.requests(1))]
    texts = TemplateBackend(load_registry()).generate(requests)
    rows = [{"round": 1, "index": r.index, "text": t, "prompt_tokens": 7, "completion_tokens": 9}
            for r, t in zip(requests, texts)]
    assert asyncio.run(actor.add(rows))
    assert order == [usage_file("coco"), "prompts/coco/round-00001.parquet"]
    assert read_round_usage(run, "coco") == {1: Usage(2, 14, 18)}
    assert asyncio.run(actor.status())["usage"] == {"requests": 2, "prompt_tokens": 14, "completion_tokens": 18}


def test_usage_is_described_and_priced_per_skill():
    from selma.core.config import PricingConfig
    from selma.prompts.usage import Usage, usage_report

    pricing = PricingConfig(prompt_per_1m=1.5, completion_per_1m=2.0, currency="EUR")
    usage = Usage(12, 2_000_000, 500_000)
    assert usage.cost(pricing) == 4.0 and usage.cost(None) is None
    assert usage.describe(pricing) == "12 requests, 2,000,000 prompt + 500,000 completion tokens, 4.0000 EUR"
    assert usage.describe(None) == "12 requests, 2,000,000 prompt + 500,000 completion tokens"
    assert Usage(3).describe(pricing) == "3 requests, no token counts reported" and Usage(3).cost(pricing) is None
    report = usage_report({"coco": usage, "whoops": Usage(1, 10, 0)}, pricing)
    assert report["usage"]["coco"] == {"requests": 12, "prompt_tokens": 2_000_000, "completion_tokens": 500_000,
                                       "cost": 4.0, "currency": "EUR"}
    assert report["usage_total"]["requests"] == 13 and report["usage_total"]["prompt_tokens"] == 2_000_010
