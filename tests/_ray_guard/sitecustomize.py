"""Refuses to start or join Ray while ``SELMA_TEST_FORBID_RAY`` is set (to the running test's id).

Fast tests (those not marked ``slow``) must not start Ray, so that ``pytest -m "not slow"`` is
Ray-free. ``tests/conftest.py`` loads this module in the pytest process and sets the variable
around every test not marked ``slow``; it also puts this folder first on ``PYTHONPATH`` for those
tests, so every Python subprocess they start (``python -m selma ...``, the ``ray`` CLI) imports it
as ``sitecustomize`` and refuses too.

Nothing is imported eagerly: an import hook wraps ``ray.init``, ``ray._private.worker.init`` and
``ray._private.node.Node.__init__`` (what starts or connects to a Ray node: ``ray.init``, Ray's
auto-init in Ray Data / Serve, ``ray start``) as soon as ``ray`` is imported. The wrappers read the
variable at call time, so the same process can run slow tests (variable unset) and fast ones.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys

ENV = "SELMA_TEST_FORBID_RAY"


class RayForbiddenError(RuntimeError):
    """A test not marked slow tried to start or connect to Ray."""


def check(what: str) -> None:
    test = os.environ.get(ENV)
    if test:
        raise RayForbiddenError(f"{what} in a test not marked slow ({test}): this test starts Ray; "
                                "mark it @pytest.mark.slow")


def _guarded(function, what: str):
    if getattr(function, "_selma_ray_guard", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        check(what)
        return function(*args, **kwargs)

    wrapper._selma_ray_guard = True
    return wrapper


def patch_ray(ray_module) -> None:
    """Wrap the entry points that start or join a Ray node (idempotent)."""
    import ray._private.node as node
    import ray._private.worker as worker

    init = _guarded(worker.init, "ray.init")
    worker.init = init
    ray_module.init = init
    node.Node.__init__ = _guarded(node.Node.__init__, "starting or joining a Ray node")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``ray`` with the other finders and patches it right after it is executed."""

    def find_spec(self, name, path, target=None):
        if name != "ray":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            patch_ray(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch ``ray`` now if it is imported, else as soon as it is (idempotent)."""
    if "ray" in sys.modules:
        patch_ray(sys.modules["ray"])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


if __name__ == "sitecustomize" and os.environ.get(ENV):
    install()
