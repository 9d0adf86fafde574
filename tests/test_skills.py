import subprocess
import sys

import pytest

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.skills import SkillError, builtin_skills, load_registry, load_skill_file

PAPER_SKILLS = {"coco", "localized_narratives", "countbench", "whoops", "diffusiondb"}
WORLD_SKILLS = {"world_objects", "world_counting", "world_binding", "world_spatial"}  # selma.world


def test_the_five_paper_skills_ship_with_seeds_rules_and_patterns():
    skills = builtin_skills()
    assert set(skills) == PAPER_SKILLS | WORLD_SKILLS
    for skill in skills.values():
        assert len(skill.seeds) >= 10 and len(set(skill.seeds)) == len(skill.seeds)
        assert skill.patterns, f"{skill.name} has no template patterns"
        request = skill.render_instruction(skill.seed_prompts(3), 20)
        assert "Create 20 more" in request and all(seed in request for seed in skill.seeds[:3])
    assert "never larger than" in builtin_skills()["countbench"].rules


def _write_skill(tmp_path, body: str, seeds: str | None = "a red kite over a beach\ntwo cats on a sofa\n\n"):
    if seeds is not None:
        (tmp_path / "seeds.txt").write_text(seeds)
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    return path


def test_a_user_skill_from_yaml_with_a_seed_file(tmp_path):
    path = _write_skill(tmp_path, "name: kites\ndescription: kites everywhere\nrules: Mention a kite.\nseed_file: seeds.txt\n")
    skill = load_skill_file(path)
    assert skill.seeds == ["a red kite over a beach", "two cats on a sofa"]
    assert "Mention a kite." in skill.render_instruction(skill.seeds, 5)
    registry = load_registry([str(path)])
    assert set(registry) == PAPER_SKILLS | WORLD_SKILLS | {"kites"}
    config = load_config("tiny", [f"skills.files=[{path}]", "skills.names=[kites]", "skills.seeds_per_skill=2"])
    assert config.skills.names == ["kites"]


@pytest.mark.parametrize("body, seeds, message", [
    ("name: k\ndescription: d\nseed_file: missing.txt\n", None, "seed_file .*missing.txt does not exist"),
    ("name: k\ndescription: d\nseed_file: seeds.txt\n", "\n\n", "has no seed prompts"),
    ("name: k\ndescription: d\nseeds: [a b c]\ninstruction: 'Write more: {examples}'\n", None, r"placeholder\(s\) \['\{num_candidates\}'\]"),
    ("name: Bad Name\ndescription: d\nseeds: [a b c]\n", None, "name"),
    ("- just\n- a list\n", None, "expected a mapping"),
])
def test_bad_skill_files_are_named_errors(tmp_path, body, seeds, message):
    path = _write_skill(tmp_path, body, seeds)
    with pytest.raises(SkillError, match=message):
        load_skill_file(path)


def test_unknown_skills_and_too_few_seeds_fail_config_validation():
    with pytest.raises(ConfigError, match=r"skills.names: unknown skill\(s\) \['nope'\]"):
        load_config("tiny", ["skills.names=[coco, nope]"])
    with pytest.raises(ConfigError, match=r"skills.seeds_per_skill: 11 seeds requested.*'diffusiondb': 10"):
        load_config("tiny", ["skills.seeds_per_skill=11"])


def test_skills_cli_lists_and_shows_user_skills(tmp_path):
    path = _write_skill(tmp_path, "name: kites\ndescription: kites everywhere\nseed_file: seeds.txt\n")
    listing = subprocess.run([sys.executable, "-m", "selma", "skills", "list", "--file", str(path)],
                             capture_output=True, text=True, check=True).stdout
    assert "kites everywhere" in listing and "countbench" in listing
    shown = subprocess.run([sys.executable, "-m", "selma", "skills", "show", "kites", "--file", str(path)],
                           capture_output=True, text=True, check=True).stdout
    assert "a red kite over a beach" in shown
    unknown = subprocess.run([sys.executable, "-m", "selma", "skills", "show", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown skill 'nope'" in unknown.stderr
