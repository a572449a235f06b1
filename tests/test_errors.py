"""Bad input gets a clear error naming the argument and the problem, before any kernel runs."""

import math

import pytest
import torch
import torch.nn.functional as F

import handgrad.functional as hf
import handgrad.nn as hnn

ops = torch.ops.handgrad


def x_w_b(dtype=torch.float32, device="cpu"):
    return (torch.randn(4, 5, dtype=dtype, device=device), torch.randn(3, 5, dtype=dtype, device=device),
            torch.randn(3, dtype=dtype, device=device))


FUSED_FUNCTIONS = [hf.linear_relu, hf.linear_sigmoid, lambda x, w, b=None: hf.linear_leaky_relu(x, w, b, 0.1)]


@pytest.mark.parametrize("fn", FUSED_FUNCTIONS)
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


@pytest.mark.parametrize("fn", FUSED_FUNCTIONS)
def test_weight_must_be_2d(fn):
    # A 1-D weight is F.linear's too (test_numerics.py); the op refuses it.
    x, _, _ = x_w_b()
    with pytest.raises(RuntimeError, match=r"weight must be 2-D \(out_features, in_features\), got shape \[2, 3, 5\]"):
        fn(x, torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match=r"weight must be 2-D \(out_features, in_features\), got shape \[5\]"):
        ops.linear_activation(x, torch.randn(5), None, "relu")


@pytest.mark.parametrize("fn", FUSED_FUNCTIONS)
def test_bias_of_wrong_size(fn):
    # A bias that broadcasts, (1, 3), is F.linear's too (test_numerics.py); the op refuses it.
    x, w, _ = x_w_b()
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\] \(out_features of weight\), got shape \[4\]"):
        fn(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\]"):
        ops.linear_activation(x, w, torch.randn(1, 3), "relu")


@pytest.mark.parametrize("fn", FUSED_FUNCTIONS)
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
def test_the_ops_refuse_dtypes_their_kernels_do_not_take(dtype):
    # The functions and modules compute these as torch does (test_numerics.py); the ops refuse.
    x = torch.ones(4, 5, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"input has dtype torch\.\w+; expected torch.float32"):
        ops.linear_activation(x, torch.ones(3, 5, dtype=dtype), None, "relu")
    with pytest.raises(RuntimeError, match=r"input has dtype torch\.\w+; expected"):
        ops.activation(x, "sigmoid")
    with pytest.raises(RuntimeError, match=r"input has dtype torch\.\w+; expected"):
        ops.mlp(x, [torch.ones(3, 5, dtype=dtype)], [], "relu")


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


@pytest.mark.cuda
def test_device_mismatch_cuda():
    x, w, b = x_w_b()
    with pytest.raises(RuntimeError, match=r"weight is on cuda:0 but input is on cpu"):
        hf.linear_relu(x, w.cuda(), b)
    with pytest.raises(RuntimeError, match=r"bias is on cpu but input is on cuda:0"):
        hf.linear_relu(x.cuda(), w.cuda(), b)


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
    with pytest.raises(TypeError, match="negative_slope must be a real number, got Tensor"):
        hf.leaky_relu(torch.randn(3), torch.tensor([0.1, 0.2]))
    # A 0-D tensor is a number, as torch's Scalar arguments take it.
    x = torch.randn(5)
    assert torch.equal(hf.leaky_relu(x, torch.tensor(0.25)), F.leaky_relu(x, 0.25))
    assert torch.equal(hnn.LeakyReLU(torch.tensor(0.25))(x), F.leaky_relu(x, 0.25))


def test_unknown_activation():
    x, w, b = x_w_b()
    with pytest.raises(ValueError, match=r"unknown activation 'elu'; expected 'relu', 'leaky_relu', 'sigmoid', 'tanh', 'silu', 'gelu', 'gelu_tanh' or 'softplus'"):
        ops.linear_activation(x, w, b, "elu", 0.0)


def test_backward_ops_check_shapes():
    with pytest.raises(RuntimeError, match=r"grad_output has shape \[2, 3\] but out_or_f has shape \[3, 2\]"):
        ops.activation_backward(torch.randn(2, 3), torch.randn(3, 2), "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"out_or_f has dtype torch.float64 but grad_output has dtype torch.float32"):
        ops.bias_activation_backward(torch.randn(2, 3), torch.randn(2, 3).double(), "relu", 0.0)


def _t(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


# Every bad-argument case of every op, as (op, arguments) built from CPU tensors.
BAD_ARGUMENTS = {
    "unknown activation": (ops.linear_activation, (_t(4, 5), _t(3, 5), None, "elu", 0.0)),
    "non-finite slope": (ops.linear_activation, (_t(4, 5), _t(3, 5), None, "leaky_relu", math.nan)),
    "integer input": (ops.linear_activation, (_t(4, 5, dtype=torch.int64), _t(3, 5, dtype=torch.int64), None, "relu", 0.0)),
    "weight dtype": (ops.linear_activation, (_t(4, 5), _t(3, 5, dtype=torch.float64), None, "relu", 0.0)),
    "bias dtype": (ops.linear_activation, (_t(4, 5), _t(3, 5), _t(3, dtype=torch.float16), "sigmoid", 0.0)),
    "0-D input": (ops.linear_activation, (_t(), _t(3, 1), None, "relu", 0.0)),
    "1-D weight": (ops.linear_activation, (_t(4, 5), _t(15), None, "relu", 0.0)),
    "weight columns": (ops.linear_activation, (_t(4, 5), _t(3, 7), None, "relu", 0.0)),
    "bias shape": (ops.linear_activation, (_t(4, 5), _t(3, 5), _t(1, 3), "relu", 0.0)),
    "activation dtype": (ops.activation, (_t(3, dtype=torch.bool), "sigmoid", 0.0)),
    "activation slope": (ops.activation, (_t(3), "leaky_relu", math.inf)),
    "activation_ dtype": (ops.activation_, (_t(3, dtype=torch.int32), "relu", 0.0)),
    "activation_ name": (ops.activation_, (_t(3), "elu", 0.0)),
    "backward shapes": (ops.activation_backward, (_t(2, 3), _t(3, 2), "relu", 0.0)),
    "backward saved dtype": (ops.activation_backward, (_t(2, 3), _t(2, 3, dtype=torch.float64), "sigmoid", 0.0)),
    "backward gradient dtype": (ops.activation_backward, (_t(2, 3, dtype=torch.int64), _t(2, 3), "relu", 0.0)),
    "bias backward 0-D": (ops.bias_activation_backward, (_t(), _t(), "relu", 0.0)),
    "bias backward shapes": (ops.bias_activation_backward, (_t(2, 3), _t(2, 4), "leaky_relu", 0.1)),
    "linear backward saved shape": (ops.linear_activation_backward, (_t(4, 2), _t(4, 5), _t(3, 5), _t(4, 2), "relu", 0.0, [True] * 3)),
    "linear backward input dtype": (ops.linear_activation_backward, (_t(4, 3), _t(4, 5, dtype=torch.float64), _t(3, 5), _t(4, 3), "relu", 0.0, [True] * 3)),
    "linear backward weight columns": (ops.linear_activation_backward, (_t(4, 3), _t(4, 5), _t(3, 6), _t(4, 3), "sigmoid", 0.0, [True] * 3)),
    "mlp checkpoint_every": (ops.mlp, (_t(4, 5), [_t(3, 5)], [], "relu", 0.0, -1)),
    "mlp no weights": (ops.mlp, (_t(4, 5), [], [], "relu", 0.0, 0)),
    "mlp bias count": (ops.mlp, (_t(4, 5), [_t(6, 5), _t(2, 6)], [_t(6)], "relu", 0.0, 0)),
    "mlp layer columns": (ops.mlp, (_t(4, 5), [_t(6, 5), _t(2, 7)], [], "relu", 0.0, 0)),
    "mlp first layer columns": (ops.mlp, (_t(4, 5), [_t(6, 4), _t(2, 6)], [], "relu", 0.0, 0)),
    "mlp 1-D weight": (ops.mlp, (_t(4, 5), [_t(6, 5), _t(6)], [], "relu", 0.0, 0)),
    "mlp bias shape": (ops.mlp, (_t(4, 5), [_t(6, 5), _t(2, 6)], [_t(6), _t(3)], "relu", 0.0, 0)),
    "mlp weight dtype": (ops.mlp, (_t(4, 5), [_t(6, 5), _t(2, 6, dtype=torch.float64)], [], "relu", 0.0, 0)),
    "mlp bias dtype": (ops.mlp, (_t(4, 5), [_t(6, 5)], [_t(6, dtype=torch.bfloat16)], "relu", 0.0, 0)),
    "mlp output_activation": (ops.mlp, (_t(4, 5), [_t(6, 5)], [], "relu", 0.0, 0, "softmax")),
    "mlp 0-D input": (ops.mlp, (_t(), [_t(6, 5)], [], "sigmoid", 0.0, 0)),
    "mlp_forward layer columns": (ops.mlp_forward, (_t(4, 5), [_t(6, 5), _t(2, 7)], [], "relu", 0.0, 0)),
    "mlp_backward saved count": (ops.mlp_backward, (_t(4, 2), _t(4, 5), [_t(6, 5), _t(2, 6)], [], [], "relu", 0.0, 0, True)),
}


def _converted(value, convert):
    """value with each tensor in it (or in it as a list) converted."""
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, list):
        return [_converted(v, convert) for v in value]
    return value


def _failure(op, args):
    with pytest.raises(Exception) as caught:
        op(*args)
    return type(caught.value), str(caught.value)


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_fake_kernels_give_the_cpu_kernels_message(case):
    """The fake kernels (torch.compile, export, meta tensors) make the C++ kernels' checks:
    each bad call fails on meta tensors and under FakeTensorMode with the CPU's error."""
    op, args = BAD_ARGUMENTS[case]
    kind, message = _failure(op, args)
    assert kind in (RuntimeError, ValueError) and message.startswith(
        ("linear_", "relu", "sigmoid", "leaky_relu", "bias_", "mlp", "handgrad: unknown activation"))
    assert "Exception raised from" not in message  # one line, no C++ backtrace
    assert _failure(op, [_converted(a, lambda t: t.to("meta")) for a in args]) == (kind, message)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert _failure(op, [_converted(a, mode.from_tensor) for a in args]) == (kind, message)


def test_checks_read_symbolic_shapes():
    # Dynamic-shape tracing hands the fake kernels SymInt sizes: valid calls trace, and a
    # mismatch still names the op and the argument.
    from torch.fx.experimental.proxy_tensor import make_fx

    def layer(x, w, b):
        return ops.linear_activation(x, w, b, "relu", 0.0)

    graph = make_fx(layer, tracing_mode="symbolic")(torch.randn(4, 5), torch.randn(3, 5), torch.randn(3))
    assert "handgrad.linear_activation" in graph.code
    x = torch.randn(6, 5)
    torch.testing.assert_close(graph(x, torch.randn(3, 5), torch.zeros(3)).shape, torch.Size([6, 3]))
    with pytest.raises(RuntimeError, match=r"^linear_relu: weight has \w+ columns but input has \w+ features"):
        make_fx(layer, tracing_mode="symbolic")(torch.randn(4, 5), torch.randn(3, 7), torch.randn(3))
    mlp = make_fx(lambda x, w0, w1: ops.mlp(x, [w0, w1], [], "relu", 0.0, 0), tracing_mode="symbolic")
    assert "handgrad.mlp" in mlp(torch.randn(4, 5), torch.randn(6, 5), torch.randn(2, 6)).code


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


@pytest.mark.parametrize("case", ["mlp layer columns", "mlp bias shape", "mlp weight dtype"])
def test_layer_by_layer_path_gives_the_ops_message(case):
    # Forward-mode AD and torch.func run mlp layer by layer in Python; it checks the whole
    # call first, with the op's check.
    op, args = BAD_ARGUMENTS[case]
    expected = _failure(op, args)
    x, weights, biases, activation, slope, _ = args
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        assert _failure(hf.mlp, (dual, weights, biases, activation, slope)) == expected
    assert _failure(torch.func.vmap(lambda row: hf.mlp(row, weights, biases, activation, slope)), (x,)) == expected


@pytest.mark.parametrize("beta", [0.0, -1.0, math.inf, math.nan])
def test_softplus_beta_must_be_positive_and_finite_everywhere(beta):
    x, w, b = x_w_b()
    message = f"beta must be a positive finite number, got {beta:g}"
    for call in (lambda: hf.linear_softplus(x, w, b, beta), lambda: hf.softplus(x, beta),
                 lambda: hnn.LinearSoftplus(5, 3, beta=beta), lambda: hnn.Softplus(beta),
                 lambda: hnn.MLP([5, 4, 2], "softplus", beta=beta)):
        with pytest.raises(ValueError, match=message):
            call()
    # The ops check it themselves, for direct callers and fake tensors, naming the op.
    with pytest.raises(ValueError, match=f"linear_softplus: {message}"):
        ops.linear_activation(x, w, b, "softplus", beta=beta)
    with pytest.raises(ValueError, match=f"mlp: {message}"):
        ops.mlp(x, [w], [b], "relu", 0.01, 0, "softplus", beta=beta)
    with pytest.raises(ValueError, match=f"softplus_backward: {message}"):
        ops.activation_backward(x, x, "softplus", 0.01, beta)


def test_softplus_threshold_must_be_a_number():
    x, w, b = x_w_b()
    with pytest.raises(ValueError, match="threshold must be a number, got nan"):
        hf.softplus(x, 1.0, math.nan)
    with pytest.raises(ValueError, match="softplus: threshold must be a number, got nan"):
        ops.activation(x, "softplus", 0.01, 1.0, math.nan)
    with pytest.raises(TypeError, match="threshold must be a real number, got str"):
        hnn.LinearSoftplus(5, 3, threshold="20")
    # An infinite threshold is softplus without its linear branch, as in eager.
    big = torch.tensor([30.0, -30.0, 0.0])
    torch.testing.assert_close(hf.softplus(big, 1.0, math.inf), torch.nn.functional.softplus(big, 1.0, math.inf))
