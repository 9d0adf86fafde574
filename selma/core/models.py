"""Model specs to local paths.

A model is named by a local path, a hub id, or ``<prefix><name>`` for a model selma builds or ships
itself (``tiny:sd``, ``tiny:sdxl@128``, ``world:base``). Each prefix has a resolver, registered as
``"module:function"`` so that resolving a spec imports its builder only when one is asked for;
:func:`resolve_model` returns a local path for prefixed specs and any other spec unchanged, for the
ordinary ``from_pretrained`` code to load. ``selma/__init__.py`` registers the built-in prefixes;
``register_model_prefix`` adds your own.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

_RESOLVERS: dict[str, str] = {}


def register_model_prefix(prefix: str, resolver: str) -> None:
    """Resolve specs starting with ``prefix`` (e.g. ``"tiny:"``) with ``resolver``, a
    ``"module:function"`` taking the spec and returning a local path."""
    module, sep, function = resolver.partition(":")
    if not (prefix and sep and module and function):
        raise ValueError(f"register_model_prefix({prefix!r}, {resolver!r}): expected a prefix and 'module:function'")
    _RESOLVERS[prefix] = resolver


def model_prefixes() -> list[str]:
    return sorted(_RESOLVERS)


def resolve_model(spec: str) -> str:
    """A local path for a prefixed spec (built or found by its resolver); any other spec unchanged."""
    for prefix, resolver in _RESOLVERS.items():
        if isinstance(spec, str) and spec.startswith(prefix):
            module, function = resolver.split(":")
            return str(getattr(importlib.import_module(module), function)(spec))
    return spec


def cache_dir() -> Path:
    """Where selma keeps what it builds once per machine (tiny models, remote adapters): $SELMA_CACHE."""
    return Path(os.environ.get("SELMA_CACHE") or Path.home() / ".cache" / "selma")


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, made by ``build(folder)`` unless it exists. Safe when several processes race:
    each builds into its own temporary folder next to the target and renames it into place; losers
    discard theirs."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    staging.chmod(0o755)
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
