"""Loading a run's config: the schema (:mod:`selma.core.config`) plus the checks that need selma's
registries — skills, merge methods and their options, reward scorers.

A run is described by one YAML file (or a preset shipped in ``selma/configs``) plus
``key.sub=value`` overrides. Everything is validated before any Ray work starts; an invalid value
raises :class:`~selma.core.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from selma.core.config import JOINT_EXPERT, SelmaConfig, apply_override, load_raw, parse_override, validate_schema
from selma.core.errors import ConfigError
from selma.eval.rewards import REWARD_SCORERS
from selma.merge.methods import MERGE_METHODS, MergeError, method_options
from selma.skills import SkillError, load_registry


def load_config(source: str | None = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> SelmaConfig:
    """Load a preset or YAML file, apply ``key.sub=value`` overrides, validate."""
    data = load_raw(source or "tiny")
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return build_config(data)


def build_config(data: dict) -> SelmaConfig:
    config = validate_schema(data)
    check_references(config)
    return config


def check_references(config: SelmaConfig) -> None:
    """What the schema alone cannot check: names that must exist in selma's registries."""
    try:
        registry = load_registry(config.skills.files)
    except SkillError as err:
        raise ConfigError(f"skills.files: {err}") from None
    unknown = [name for name in config.skills.names if name not in registry]
    if unknown:
        raise ConfigError(f"skills.names: unknown skill(s) {unknown}; known: {sorted(registry)}")
    try:
        for name in config.skills.names:
            registry[name].acceptor()
    except SkillError as err:
        raise ConfigError(f"skills.names: {err}") from None
    short = {name: len(registry[name].seeds) for name in config.skills.names
             if len(registry[name].seeds) < config.skills.seeds_per_skill}
    if short:
        raise ConfigError(f"skills.seeds_per_skill: {config.skills.seeds_per_skill} seeds requested, "
                          f"but these skills have fewer: {short}")
    if config.merge.method not in MERGE_METHODS:
        raise ConfigError(f"merge.method: unknown method {config.merge.method!r}; known: {sorted(MERGE_METHODS)}")
    try:
        method_options(config.merge.method, config.merge.options)
    except MergeError as err:
        raise ConfigError(f"merge.options: {err}") from None
    if config.train.mode == "joint" and JOINT_EXPERT in config.skills.names:
        raise ConfigError(f"skills.names: {JOINT_EXPERT!r} names the joint adapter when "
                          "train.mode is joint; rename that skill")
    if config.merge.weights is not None:
        stray = sorted(set(config.merge.weights) - set(config.expert_names))
        absent = sorted(set(config.expert_names) - set(config.merge.weights))
        if stray or absent:
            raise ConfigError(f"merge.weights: must give one weight per expert "
                              f"(not experts of this run: {stray}; missing: {absent})")
    unknown_rewards = sorted(set(config.eval.rewards) - set(REWARD_SCORERS))
    if unknown_rewards:
        raise ConfigError(f"eval.rewards: unknown reward scorer(s) {unknown_rewards}; known: {sorted(REWARD_SCORERS)}")
