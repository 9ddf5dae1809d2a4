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
