"""The guard in tests/conftest.py: a test not marked slow cannot start or join Ray, in-process or in a
subprocess, so ``pytest -m "not slow"`` is Ray-free (tests/_ray_guard/sitecustomize.py)."""

import os
import subprocess
import sys

import pytest

from selma.config import load_config


def test_fast_tests_run_with_the_guard_on():
    assert os.environ["SELMA_TEST_FORBID_RAY"].endswith("test_fast_tests_run_with_the_guard_on")
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0].endswith("_ray_guard")


def test_ray_init_and_selmas_init_ray_refuse_in_a_fast_test(monkeypatch):
    import ray

    from selma.raylib import init_ray

    # A slow test earlier in the session may have left the shared local Ray running: init_ray
    # would then reuse it without calling ray.init, which this test is about.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.slow"):
        ray.init(address="local", num_cpus=1, include_dashboard=False)
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.slow"):
        init_ray(load_config("tiny").ray)


def test_a_subprocess_of_a_fast_test_refuses_ray_but_imports_lazily_as_before():
    starts = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='local', num_cpus=1)"],
                            capture_output=True, text=True, timeout=120)
    assert starts.returncode != 0 and "mark it @pytest.mark.slow" in starts.stderr, starts.stderr[-2000:]
    lazy = subprocess.run([sys.executable, "-c", "import sys, selma.config; print('ray' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert lazy.stdout.strip() == "False", lazy.stderr
