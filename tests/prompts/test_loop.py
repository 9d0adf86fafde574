import pytest

from selma.config import load_config
from selma.llm.template import TemplateBackend
from selma.prompts.loop import PromptLoop
from selma.prompts.diversity import rouge_l
from selma.skills import load_registry


def _run(config, written=None):
    registry = load_registry()
    loop = PromptLoop(TemplateBackend(registry), config.prompts, "template")
    states, rows = [], []
    for name in config.skills.names:
        skill = registry[name]
        state, seed_rows = loop.start_skill(skill, skill.seed_prompts(config.skills.seeds_per_skill),
                                            (written or {}).get(name, []))
        rows += seed_rows
        states.append(state)
    rounds = []
    loop.run(states, lambda accepted: rounds.append(accepted))
    for accepted in rounds:
        for skill_rows in accepted.values():
            rows += skill_rows
    return states, rows


def test_every_skill_reaches_n_diverse_prompts_reproducibly():
    config = load_config("tiny", ["prompts.per_skill=25"])
    states, rows = _run(config)
    llm = [r for r in rows if r.origin == "llm"]
    for name in config.skills.names:
        texts = [r.prompt for r in llm if r.skill == name]
        assert len(texts) == 25
        assert len({r.prompt_id for r in llm if r.skill == name}) == 25
        pool = [r.prompt for r in rows if r.skill == name]
        for i, text in enumerate(texts[:10]):
            assert all(rouge_l(other, text) <= 0.8 for other in pool if other != text)
    stats = {s.skill.name: s.stats for s in states}
    assert all(s.accepted == 25 and s.requests >= 1 for s in stats.values())
    assert [r.prompt for r in _run(config)[1]] == [r.prompt for r in rows]
    countbench = [r.prompt.lower() for r in llm if r.skill == "countbench"]
    assert not any(word in text.split() for text in countbench for word in ("four", "five", "six"))


def test_requests_show_three_examples_from_the_pool_and_the_skill_rules():
    config = load_config("tiny")
    registry = load_registry()
    seen = []

    class Recorder(TemplateBackend):
        def generate(self, requests):
            seen.extend(requests)
            return super().generate(requests)

    loop = PromptLoop(Recorder(registry), config.prompts, "template")
    skill = registry["countbench"]
    state, _ = loop.start_skill(skill, skill.seed_prompts(3), [])
    loop.run_round([state])
    request = seen[0].prompt
    assert "never larger than 3" in request
    assert "Create 20 more diverse image descriptions" in request
    assert request.rstrip().endswith("4.")
    assert sum(seed in request for seed in skill.seed_prompts(3)) == 3


def test_resume_from_written_rows_finishes_without_duplicates():
    config = load_config("tiny", ["prompts.per_skill=20", "skills.names=[coco, whoops]"])
    _, full = _run(config)
    partial = {}
    for name in ("coco", "whoops"):
        rows = [r for r in full if r.skill == name]
        partial[name] = rows[: 3 + 7]  # the seeds and the first 7 accepted prompts
    _, rest = _run(config, partial)
    for name in ("coco", "whoops"):
        combined = partial[name] + [r for r in rest if r.skill == name]
        llm = [r.prompt_id for r in combined if r.origin == "llm"]
        assert len(llm) == 20 and len(set(llm)) == 20
        assert not [r for r in rest if r.skill == name and r.origin == "seed"]


def test_a_backend_that_returns_garbage_gives_a_clear_error():
    config = load_config("tiny", ["prompts.max_rounds=3", "skills.names=[coco]"])

    class Garbage:
        def generate(self, requests):
            return ["\x00\x00 ###"] * len(requests)

    registry = load_registry()
    loop = PromptLoop(Garbage(), config.prompts, "garbage")
    state, _ = loop.start_skill(registry["coco"], registry["coco"].seed_prompts(3), [])
    with pytest.raises(RuntimeError, match="max_rounds=3"):
        loop.run([state], lambda accepted: None)
    assert state.stats.unparseable >= 3 and state.accepted == 0
