"""Skill registry: the five built-in SELMA skills plus user skills from YAML.

A skill is a style of image description: a name, the extra rule the LLM instruction adds, seed
prompts that start the in-context pool, and (for the offline template backend) phrase patterns,
optionally with the skill's own ``vocabulary`` for their slots (used before the backend's global
vocabulary; see :mod:`selma.llm.template`).
"""

from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selma.core.errors import InputError

BUILTIN_DIR = Path(__file__).parent / "builtin"

DEFAULT_INSTRUCTION = (
    "Create {num_candidates} more diverse image descriptions for a text-to-image model. "
    "Each description should test some of these skills: spatial, count, animal, human, object, "
    "location, activity, color, attribute, food, material, shape. Use diverse everyday objects. "
    "{rules}Keep each description under {max_words} words and vary the text style.\n\n"
    "{examples}"
)
REQUIRED_PLACEHOLDERS = ("{examples}", "{num_candidates}")
VOCABULARY_SLOT = re.compile(r"^[a-z_]+$")


class SkillError(InputError):
    """A skill definition that cannot be used."""


class Skill(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    description: str
    rules: str = ""
    seeds: list[str] = Field(default_factory=list)
    seed_file: str | None = None
    max_words: int = Field(30, ge=3)
    max_count: int | None = Field(None, ge=1)
    instruction: str = DEFAULT_INSTRUCTION
    patterns: list[str] = Field(default_factory=list, description="phrase patterns for the template backend")
    vocabulary: dict[str, list[str]] = Field(
        default_factory=dict, description="the template backend's words for pattern slots, before its global vocabulary")
    accept: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'module:function' taking a prompt and returning whether the skill accepts it "
                    "(e.g. to keep held-out test prompts out of training)")

    @field_validator("vocabulary")
    @classmethod
    def _slot_words(cls, vocabulary: dict[str, list[str]]) -> dict[str, list[str]]:
        for slot, words in vocabulary.items():
            if not VOCABULARY_SLOT.match(slot):
                raise ValueError(f"slot name {slot!r}: lowercase letters and underscores only")
            if not words or any(not str(word).strip() for word in words):
                raise ValueError(f"slot {slot!r} needs a non-empty list of non-empty words")
        return vocabulary

    @field_validator("instruction")
    @classmethod
    def _has_placeholders(cls, text: str) -> str:
        missing = [p for p in REQUIRED_PLACEHOLDERS if p not in text]
        if missing:
            raise ValueError(f"instruction template lacks the placeholder(s) {missing}")
        return text

    def acceptor(self):
        """The ``accept`` predicate, imported (None when the skill accepts every prompt)."""
        if self.accept is None:
            return None
        module, _, function = self.accept.partition(":")
        try:
            predicate = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise SkillError(f"skill {self.name!r}: accept {self.accept!r} cannot be imported: {err}") from None
        if not callable(predicate):
            raise SkillError(f"skill {self.name!r}: accept {self.accept!r} is not callable")
        return predicate

    def seed_prompts(self, count: int | None = None) -> list[str]:
        seeds = list(self.seeds)
        if count is not None:
            if len(seeds) < count:
                raise SkillError(f"skill {self.name!r} has {len(seeds)} seed prompts, {count} requested")
            seeds = seeds[:count]
        return seeds

    def render_instruction(self, examples: list[str], num_candidates: int, *, chat: bool = False) -> str:
        """The LLM request: instruction + numbered examples, ending in the next number for the model
        to continue the list; ``chat``: a chat model's user message, asking for the numbered list."""
        first = len(examples) + 1
        numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, start=1))
        if not chat:
            numbered += f"\n{first}."
        rules = f"{self.rules.strip()} " if self.rules.strip() else ""
        text = self.instruction.format(
            num_candidates=num_candidates, rules=rules, max_words=self.max_words, examples=numbered
        )
        if chat:
            text += (f"\n\nReply with the {num_candidates} new descriptions only, as a numbered list from "
                     f"{first} to {first + num_candidates - 1}, one description per line.")
        return text


def load_skill_file(path: str | Path) -> Skill:
    path = Path(path)
    if not path.exists():
        raise SkillError(f"skill file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SkillError(f"skill file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SkillError(f"skill file {path}: expected a mapping")
    seed_file = data.get("seed_file")
    if seed_file:
        seed_path = (path.parent / seed_file).resolve()
        if not seed_path.exists():
            raise SkillError(f"skill file {path}: seed_file {seed_path} does not exist")
        data["seeds"] = [line.strip() for line in seed_path.read_text().splitlines() if line.strip()]
    try:
        skill = Skill.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SkillError(f"skill file {path}: {problems}") from None
    if not skill.seeds:
        raise SkillError(f"skill file {path}: skill {skill.name!r} has no seed prompts")
    return skill


@lru_cache(maxsize=1)
def builtin_skills() -> dict[str, Skill]:
    skills = [load_skill_file(p) for p in sorted(BUILTIN_DIR.rglob("*.yaml"))]
    return {s.name: s for s in skills}


def load_registry(files: list[str] | tuple[str, ...] = ()) -> dict[str, Skill]:
    """Built-in skills plus those defined in ``files`` (a user skill may replace a built-in one)."""
    registry = dict(builtin_skills())
    for file in files:
        skill = load_skill_file(file)
        registry[skill.name] = skill
    return registry
