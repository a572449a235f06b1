"""Fixtures of the test suite; its shared cases are in samples.py."""

import pytest
import torch

from samples import DEVICES


def pytest_collection_modifyitems(config, items):
    # Tests marked cuda (a `device` case "cuda", tests/test_cuda.py) are collected everywhere
    # and skipped without a GPU, so that a CPU run lists how many it did not run.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test that takes `device` runs on the CPU, and on CUDA where there is a GPU."""
    return request.param
