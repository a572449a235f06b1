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


@pytest.fixture(params=["DEFAULT", "AVX2", "AVX512"])
def cpu_capability(request):
    """Each test that takes `cpu_capability` runs with the CPU kernels of every capability
    this CPU offers and the build has (handgrad loads one library per capability), then
    the capability chosen at import runs again."""
    from handgrad import _capability

    if request.param not in _capability.runnable():
        pytest.skip(f"{request.param} kernels: this CPU offers {_capability.offered()}, the build "
                    f"has {', '.join(_capability._build_config.CPU_CAPABILITIES)}")
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu" \
            and request.param != _capability.runnable()[-1]:
        pytest.skip("the CPU kernels do not run on this device: once is enough")
    chosen = _capability.running()[0]
    _capability.load(request.param)
    try:
        yield request.param
    finally:
        _capability.load(chosen)
