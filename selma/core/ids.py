"""Deterministic ids and seeds: a rerun computes the same ones, so it skips finished rows and never
duplicates one, and an image is redrawn from the same noise."""

from __future__ import annotations

import hashlib


def prompt_id(skill: str, text: str) -> str:
    return hashlib.sha256(f"{skill}\x00{text}".encode()).hexdigest()[:16]


def image_id(prompt_id: str, index: int) -> str:
    return hashlib.sha256(f"{prompt_id}\x00{index}".encode()).hexdigest()[:16]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (and their order)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_seed(base_seed: int, image_id_: str) -> int:
    return derived_seed(base_seed, image_id_) % (2**63)
