"""The test suite's own options (tests/conftest.py)."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_a_sampled_run_keeps_a_case_of_every_test_and_about_one_in_n():
    # check-aarch64 runs HANDGRAD_TEST_SAMPLE=4 under emulation: each test of the files must
    # still run, on about a quarter of its cases.
    def collected(sample):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                              os.path.join(TESTS, "test_second_order.py")], capture_output=True, text=True,
                             env={**os.environ, "HANDGRAD_TEST_SAMPLE": sample}, cwd=TESTS)
        return run, [line for line in run.stdout.splitlines() if "::" in line]
    _, every = collected("1")
    _, sampled = collected("4")
    assert {case.split("[")[0] for case in sampled} == {case.split("[")[0] for case in every}
    assert set(sampled) < set(every) and 0.15 < len(sampled) / len(every) < 0.35, (len(sampled), len(every))
    run, _ = collected("0")
    assert run.returncode != 0 and "HANDGRAD_TEST_SAMPLE must be a whole number of at least 1, got '0'" in run.stderr
