"""Fixtures of the test suite; its shared cases are in samples.py.

HANDGRAD_TEST_SAMPLE=N runs about one in N of each test's cases, chosen by a hash of their
ids (the same ones on every run), and at least one case of each test: under emulation
(make check-aarch64), where each test's whole grid would take an hour.
"""

import os
import zlib

import pytest
import torch

from samples import DEVICES


@pytest.hookimpl(trylast=True)  # after -k and --deselect: the sample is of what they leave
def pytest_collection_modifyitems(config, items):
    # Tests marked cuda (a `device` case "cuda", tests/test_cuda.py) are collected everywhere
    # and skipped without a GPU, so that a CPU run lists how many it did not run.
    gpu = torch.cuda.is_available()
    if not gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    sample = os.environ.get("HANDGRAD_TEST_SAMPLE", "1")
    if not sample.isdigit() or int(sample) < 1:
        raise pytest.UsageError(f"HANDGRAD_TEST_SAMPLE must be a whole number of at least 1, got {sample!r}")
    if int(sample) == 1:
        return
    runs = [item for item in items if gpu or "cuda" not in item.keywords]
    kept = [item for item in runs if zlib.crc32(item.nodeid.encode()) % int(sample) == 0]
    tests_kept = {item.nodeid.split("[")[0] for item in kept}
    for item in runs:
        test = item.nodeid.split("[")[0]
        if test not in tests_kept:
            kept.append(item)
            tests_kept.add(test)
    kept_ids = {item.nodeid for item in kept}
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in kept_ids])
    items[:] = [item for item in items if item.nodeid in kept_ids]


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
