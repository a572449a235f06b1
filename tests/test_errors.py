"""Bad input gets a clear error naming the argument and the problem, before any kernel runs."""

import math

import pytest
import torch

import handgrad.functional as hf
import handgrad.nn as hnn

ops = torch.ops.handgrad


def x_w_b(dtype=torch.float32, device="cpu"):
    return (torch.randn(4, 5, dtype=dtype, device=device), torch.randn(3, 5, dtype=dtype, device=device),
            torch.randn(3, dtype=dtype, device=device))


FUSED = [hf.linear_relu, hf.linear_sigmoid, lambda x, w, b=None: hf.linear_leaky_relu(x, w, b, 0.1)]


@pytest.mark.parametrize("fn", FUSED)
def test_shape_mismatch_names_both_sizes(fn):
    x, _, b = x_w_b()
    with pytest.raises(RuntimeError, match=r"weight has 7 columns but input has 5 features"):
        fn(x, torch.randn(3, 7), b)


def test_message_starts_with_the_function_name():
    x, _, _ = x_w_b()
    with pytest.raises(RuntimeError, match=r"^linear_relu: weight has 7 columns"):
        hf.linear_relu(x, torch.randn(3, 7))
    with pytest.raises(RuntimeError, match=r"^linear_leaky_relu: "):
        hf.linear_leaky_relu(x, torch.randn(3, 7))


@pytest.mark.parametrize("fn", FUSED)
def test_weight_must_be_2d(fn):
    x, _, _ = x_w_b()
    with pytest.raises(RuntimeError, match=r"weight must be 2-D \(out_features, in_features\), got shape \[15\]"):
        fn(x, torch.randn(15))


@pytest.mark.parametrize("fn", FUSED)
def test_bias_of_wrong_size(fn):
    x, w, _ = x_w_b()
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\] \(out_features\), got shape \[4\]"):
        fn(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\]"):
        fn(x, w, torch.randn(1, 3))


@pytest.mark.parametrize("fn", FUSED)
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_dtype_mismatch(fn, which):
    x, w, b = x_w_b()
    if which == "weight":
        w = w.double()
    else:
        b = b.double()
    with pytest.raises(RuntimeError, match=rf"{which} has dtype torch.float64 but input has dtype torch.float32"):
        fn(x, w, b)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_unsupported_dtypes(dtype):
    x = torch.ones(4, 5, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"input has dtype torch\.\w+; expected torch.float32"):
        hf.linear_relu(x, torch.ones(3, 5, dtype=dtype))
    with pytest.raises(RuntimeError, match=r"input has dtype torch\.\w+; expected"):
        hf.sigmoid(x)


def test_zero_dim_input():
    with pytest.raises(RuntimeError, match=r"at least 1 dimension, got a 0-D tensor"):
        hf.linear_relu(torch.tensor(1.0), torch.randn(3, 1))


def test_device_mismatch_names_both_devices():
    # A meta tensor stands in for a second device on a machine without a GPU.
    x, w, b = x_w_b()
    with pytest.raises(RuntimeError, match=r"weight is on meta but input is on cpu"):
        ops.linear_activation(x, w.to("meta"), b, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"bias is on meta but input is on cpu"):
        ops.linear_activation(x, w, b.to("meta"), "relu", 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_cuda():
    x, w, b = x_w_b()
    with pytest.raises(RuntimeError, match=r"weight is on cuda:0 but input is on cpu"):
        hf.linear_relu(x, w.cuda(), b)


@pytest.mark.parametrize("slope", [math.inf, -math.inf, math.nan])
def test_non_finite_slope_rejected_everywhere(slope):
    x, w, b = x_w_b()
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        hf.linear_leaky_relu(x, w, b, slope)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        hf.leaky_relu(x, slope)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        hnn.LinearLeakyReLU(5, 3, negative_slope=slope)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        hnn.LeakyReLU(slope)
    # The ops check it themselves, for direct callers.
    with pytest.raises(ValueError, match="linear_leaky_relu: negative_slope must be a finite number"):
        ops.linear_activation(x, w, b, "leaky_relu", slope)


def test_slope_must_be_a_number():
    with pytest.raises(TypeError, match="negative_slope must be a real number, got str"):
        hf.leaky_relu(torch.randn(3), "0.1")


def test_unknown_activation():
    x, w, b = x_w_b()
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; expected 'relu', 'leaky_relu' or 'sigmoid'"):
        ops.linear_activation(x, w, b, "gelu", 0.0)


def test_backward_ops_check_shapes():
    with pytest.raises(RuntimeError, match=r"grad_output has shape \[2, 3\] but saved has shape \[3, 2\]"):
        ops.activation_backward(torch.randn(2, 3), torch.randn(3, 2), "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"saved has dtype torch.float64 but grad_output has dtype torch.float32"):
        ops.bias_activation_backward(torch.randn(2, 3), torch.randn(2, 3).double(), "relu", 0.0)


def test_fake_kernels_make_the_same_checks():
    # Under torch.compile/export the fake kernels run instead of C++: same messages.
    x, w, b = (t.to("meta") for t in x_w_b())
    with pytest.raises(RuntimeError, match=r"weight has 7 columns but input has 5 features"):
        ops.linear_activation(x, torch.randn(3, 7, device="meta"), b, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\]"):
        ops.linear_activation(x, w, torch.randn(4, device="meta"), "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"weight has dtype torch.float64 but input has dtype torch.float32"):
        ops.linear_activation(x, w.double(), b, "relu", 0.0)


def test_non_tensor_arguments_are_named():
    # As F.linear: "linear(): argument 'input' (position 1) must be Tensor, not list".
    with pytest.raises(TypeError, match=r"^linear_relu\(\): argument 'input' \(position 1\) must be Tensor, not list$"):
        hf.linear_relu([1.0, 2.0], torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"argument 'weight' \(position 2\) must be Tensor, not list"):
        hf.linear_sigmoid(torch.ones(2, 3), [1.0])
    with pytest.raises(TypeError, match=r"argument 'bias' \(position 3\) must be Tensor, not str"):
        hf.linear_leaky_relu(torch.ones(2, 3), torch.ones(4, 3), "b")
    with pytest.raises(TypeError, match=r"^relu\(\): argument 'input' \(position 1\) must be Tensor, not list"):
        hf.relu([1.0])
    with pytest.raises(TypeError, match=r"^sigmoid\(\): argument 'input'"):
        hf.sigmoid(3.0)
