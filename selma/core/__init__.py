"""selma's base layer: what every stage shares and nothing above it may change.

* :mod:`selma.core.errors` — :class:`InputError` (exit 2) and :class:`ConfigError`.
* :mod:`selma.core.config` — the typed config schema (one model per section).
* :mod:`selma.core.rundir` — the run directory: atomic files, the manifest, the one-writer lock.
* :mod:`selma.core.ids` — deterministic prompt and image ids and the seeds derived from them.
* :mod:`selma.core.models` — model specs to local paths: a registry keyed by spec prefix.
* :mod:`selma.core.scoring` — DSG's dependency rule, shared by the benchmarks and the shapes world.

``core`` imports nothing else from selma (tests/test_imports.py checks it); the stages, the
pipeline and the CLI build on it.
"""
