"""Fixtures of the test suite; its shared cases are in samples.py.

HANDGRAD_TEST_SAMPLE=N runs each test's first case and about one in N of the rest, chosen by
a hash of their ids (the same ones on every run): under emulation (make check-aarch64),
where each test's whole grid would take an hour.
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
    if sample == "1":
        return
    kept, dropped, tests = [], [], set()
    for item in items:  # each test's first case that runs, and about one in N of the rest
        test = item.nodeid.split("[")[0]
        runs = gpu or "cuda" not in item.keywords
        if runs and (test not in tests or zlib.crc32(item.nodeid.encode()) % int(sample) == 0):
            kept.append(item)
            tests.add(test)
        else:
            dropped.append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


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
