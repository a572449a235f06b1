"""The main job (make demo) and the build's front door."""

import os
import subprocess
import sys

from handgrad.examples import fig7_8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fig7_8_trains_both_models_alike_and_writes_the_figure(tmp_path, capsys):
    torch_losses, handgrad_losses, truth = fig7_8.main(["--epochs", "12", "--out", str(tmp_path)])
    assert len(torch_losses) == len(handgrad_losses) == len(truth) == 12
    assert torch_losses[-1] < 0.5 * torch_losses[0]  # it does train
    # Rounding apart, the same training: within float32 rounding of the float64 run, no
    # farther from it than torch.nn is (with room for the last bits of a few epochs).
    torch_error = max(abs(a - t) for a, t in zip(torch_losses, truth))
    handgrad_error = max(abs(b - t) for b, t in zip(handgrad_losses, truth))
    assert handgrad_error < 1e-5 and handgrad_error <= 4 * torch_error + 1e-7
    assert (tmp_path / "fig7_8.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "identical initial parameters: True" in printed
    assert "max |difference|" in printed and "max error against the float64 run" in printed


def test_setup_without_torch_stops_with_a_clear_message():
    # As `pip install .` would run it in an environment without torch.
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "PyTorch must be installed before handgrad is built" in result.stderr
    assert "--no-build-isolation" in result.stderr
    assert "Traceback" not in result.stderr


def test_setup_under_build_isolation_says_so():
    # As pip's isolated build runs it: torch is installed, but not visible to the build.
    code = ("import sys; sys.modules['torch'] = None; sys.path.append('/tmp/pip-build-env-x/overlay'); "
            "sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip is building in an isolated environment" in result.stderr
    assert "PyTorch must be installed" not in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr


def test_the_cpu_kernels_are_chosen_for_the_cpu_and_lowered_by_the_environment(monkeypatch):
    import pytest
    import torch

    from handgrad import _capability

    monkeypatch.setattr(_capability._build_config, "CPU_CAPABILITIES", ("DEFAULT", "AVX2", "AVX512"))
    monkeypatch.delenv("HANDGRAD_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert _capability.choose() == "AVX2"  # the best the CPU offers, never more
    assert _capability.choose("default") == "DEFAULT"  # lowered on request
    with pytest.warns(RuntimeWarning, match="AVX512 cannot run here .*offers AVX2.*running AVX2"):
        assert _capability.choose("AVX512") == "AVX2"
    with pytest.raises(ValueError, match="HANDGRAD_CPU_CAPABILITY='SSE9' is not a CPU capability"):
        _capability.choose("SSE9")
    monkeypatch.setenv("HANDGRAD_CPU_CAPABILITY", "DEFAULT")
    assert _capability.choose() == "DEFAULT"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SVE256")  # e.g. on Arm
    monkeypatch.delenv("HANDGRAD_CPU_CAPABILITY")
    assert _capability.choose() == "DEFAULT"
    with pytest.raises(RuntimeError, match="this CPU offers DEFAULT, so the AVX2 kernels cannot run"):
        _capability.load("AVX2")
    monkeypatch.setattr(_capability._build_config, "CPU_CAPABILITIES", ("DEFAULT",))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert _capability.choose() == "DEFAULT"  # a build for one capability runs it anywhere

