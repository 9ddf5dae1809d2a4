import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh random inputs every run
    import fastpeft

    fastpeft.set_backend(None)
    yield
    fastpeft.set_backend(None)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and does not fight parallel test processes for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
