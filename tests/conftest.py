import os

import pytest


def pytest_configure(config):
    # Tiny models are built once per test session, into a private cache.
    if "SELMA_CACHE" not in os.environ:
        import tempfile

        os.environ["SELMA_CACHE"] = tempfile.mkdtemp(prefix="selma-test-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
