import importlib.util
import os
from pathlib import Path

import pytest

# Fast tests (not marked slow) must not start Ray: see tests/_ray_guard/sitecustomize.py.
RAY_GUARD_DIR = Path(__file__).parent / "_ray_guard"
RAY_FIXTURES = ("ray_local", "selma_server")


def _load_ray_guard():
    spec = importlib.util.spec_from_file_location("selma_test_ray_guard", RAY_GUARD_DIR / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ray_guard = _load_ray_guard()


def pytest_configure(config):
    # Tiny models are built once per test session, into a private cache.
    if "SELMA_CACHE" not in os.environ:
        import tempfile

        os.environ["SELMA_CACHE"] = tempfile.mkdtemp(prefix="selma-test-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray_guard.install()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around every test not marked slow (its fixtures included): Ray refuses to start or connect,
    in this process and in the Python subprocesses the test starts."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    saved = {key: os.environ.get(key) for key in (ray_guard.ENV, "PYTHONPATH")}
    os.environ[ray_guard.ENV] = item.nodeid
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(RAY_GUARD_DIR), saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") is None:
        uses = [name for name in RAY_FIXTURES if name in item.fixturenames]
        if uses:
            pytest.fail(f"this test starts Ray (fixture {', '.join(uses)}); mark it @pytest.mark.slow", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session; never joins another cluster on this machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on 2 shared cores, torch's spinning OpenMP threads slow tiny
    models 10-40x as soon as another process (Ray, another test run) holds a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def selma_server():
    """``start(run_dir, env=None)``: `selma serve RUN` in its own process group; returns its base URL
    once /healthz answers. Every server started is stopped at the end of the test."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    servers = []

    def start(run_dir, env=None, timeout: float = 240) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "selma", "serve", str(run_dir), "--port", str(port)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        servers.append(server)
        deadline = time.time() + timeout
        while True:
            assert server.poll() is None, server.stdout.read()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    return f"http://127.0.0.1:{port}"
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(2)

    yield start
    for server in servers:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
