"""Shared cases: every handgrad function next to the eager PyTorch code it replaces."""

import pytest
import torch
import torch.nn.functional as F

import handgrad.functional as hf

# Slopes: the default, positive, 1 (the identity), 0 (ReLU), negative (f is recomputed), above 1.
SLOPES = [0.01, 0.2, 1.0, 0.0, -0.5, 1.5]


def _fused_cases():
    cases = [
        pytest.param(hf.linear_relu, lambda x, w, b: F.relu(F.linear(x, w, b)), id="linear_relu"),
        pytest.param(
            hf.linear_sigmoid, lambda x, w, b: torch.sigmoid(F.linear(x, w, b)), id="linear_sigmoid"
        ),
    ]
    for slope in SLOPES:
        cases.append(
            pytest.param(
                lambda x, w, b, s=slope: hf.linear_leaky_relu(x, w, b, negative_slope=s),
                lambda x, w, b, s=slope: F.leaky_relu(F.linear(x, w, b), s),
                id=f"linear_leaky_relu[{slope}]",
            )
        )
    return cases


def _activation_cases():
    cases = [
        pytest.param(hf.relu, F.relu, id="relu"),
        pytest.param(hf.sigmoid, torch.sigmoid, id="sigmoid"),
    ]
    for slope in SLOPES:
        cases.append(
            pytest.param(
                lambda x, s=slope: hf.leaky_relu(x, negative_slope=s),
                lambda x, s=slope: F.leaky_relu(x, s),
                id=f"leaky_relu[{slope}]",
            )
        )
    return cases


FUSED = _fused_cases()
ACTIVATIONS = _activation_cases()

# Every dtype eager's F.linear and activations support on the CPU.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tolerances(dtype):
    """assert_close tolerances against eager PyTorch.

    The forward is computed as eager's is (the bias added inside the GEMM, rounded once),
    so it agrees to the last rounding. In bfloat16 and float16 the gradients' GEMMs may add
    in another order than eager's, which can move a result by one rounding step of its own
    size; tests against a float64 truth (test_numerics.py) bound the error itself.
    """
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 2e-2}
    if dtype == torch.float16:
        return {"rtol": 4e-3, "atol": 4e-3}
    return {}


def grads(output, inputs, grad_output):
    """Gradients of <output, grad_output> w.r.t. those of `inputs` that require grad."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(output, wanted, grad_output)


def errors(value, truth):
    """Absolute differences from a float64 truth, flattened."""
    return (value.double() - truth.double()).abs().flatten()


def assert_as_accurate_as_eager(got, eager, truth, factor=2.0):
    """got is no farther from the float64 truth than eager's result is, within `factor` (sums
    in another order round differently) and one rounding step of the largest value: in the
    mean and at the 99th percentile, which a gross error moves and a few elements whose f
    rounded to the other side of a kink do not."""
    assert got.shape == eager.shape == truth.shape and got.dtype == eager.dtype
    if got.dtype == torch.float64:  # the truth is eager itself: agree to float64 rounding
        torch.testing.assert_close(got, truth.to(got.dtype))
        return
    if truth.numel() < 16:
        # Too few elements for a statistic: in low precision one stored value that rounded
        # the other way decides them (a saturated sigmoid's 1 - out moves 14 % with one
        # bfloat16 step). Held to eager's tolerances instead.
        torch.testing.assert_close(got, eager, **tolerances(got.dtype))
        return
    floor = torch.finfo(got.dtype).eps * truth.double().abs().max().item()
    ours, theirs = errors(got, truth), errors(eager, truth)
    for name, statistic in (("mean", torch.mean), ("99th percentile", lambda e: torch.quantile(e[:1 << 24], 0.99))):
        a, b = statistic(ours).item(), statistic(theirs).item()
        assert a <= factor * b + floor, f"{name} error {a:.3e} against float64, eager's {b:.3e}"
