import pytest

from selma.config import load_config
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
