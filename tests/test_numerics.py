"""Numerics like eager's: bfloat16 and float16 results against a float64 truth, and PyTorch's
own OpInfo samples for nn.functional.linear in every dtype.

The truth is the same layer in float64 on the same (low-precision) inputs. handgrad must be
no further from it than eager nn.Linear + activation is: the bias added inside the GEMM and
rounded once, as F.linear does, so no ReLU mask flips that eager's does not.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from samples import LOW_PRECISION, assert_as_accurate_as_eager, eager_activation, eager_layer, fused_layer, tolerances

import handgrad.functional as hf

SLOPE = 0.1

LAYERS = {name: (fused_layer(name, negative_slope=SLOPE), eager_activation(name, negative_slope=SLOPE))
          for name in ("relu", "leaky_relu", "sigmoid")}  # name: (handgrad, eager activation)


def eager(activation, x, w, b):
    return LAYERS[activation][1](F.linear(x, w, b))


def outputs_and_grads(layer, x, w, b, grad_output):
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    out = layer(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad_output.to(out.dtype)))


@pytest.mark.parametrize("activation", LAYERS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_error_against_float64_truth_is_no_worse_than_eagers(activation, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=g).to(dtype)
    w = (torch.randn(64, 128, generator=g) / 128**0.5).to(dtype)
    b = torch.randn(64, generator=g).to(dtype)
    grad_output = torch.randn(256, 64, generator=g).to(dtype)

    truth = outputs_and_grads(lambda *a: eager(activation, *a), x.double(), w.double(),
                              b.double(), grad_output.double())
    ours = outputs_and_grads(LAYERS[activation][0], x, w, b, grad_output)
    theirs = outputs_and_grads(lambda *a: eager(activation, *a), x, w, b, grad_output)
    for name, mine, eagers, exact in zip(["out", "grad_input", "grad_weight", "grad_bias"],
                                         ours, theirs, truth):
        assert mine.dtype == dtype
        # The fused kernel rounds a sigmoid's output once (from f in float32), eager twice;
        # the 64 sums of the sigmoid's bias gradient then land up to 9 % either side of
        # eager's error (measured over 12 seeds); everything else within 5 %.
        factor = 1.15 if (activation, name) == ("sigmoid", "grad_bias") else 1.05
        # At these sizes the whole tensor's error is a steady statistic: no rounding's slack.
        assert_as_accurate_as_eager(mine, eagers, exact, factor, extra=1e-6)
    if activation == "relu":
        flips = lambda out: ((out > 0) != (truth[0] > 0)).sum().item()  # noqa: E731
        assert flips(ours[0]) <= flips(theirs[0])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_bias_is_added_inside_the_product_and_rounded_once(dtype):
    # 100 + 0.25 - 100: rounding 100.25 to bfloat16 first (100) would give relu(0) = 0.
    x = torch.tensor([[1.0, 1.0]], dtype=dtype)
    w = torch.tensor([[100.0, 0.25]], dtype=dtype)
    b = torch.tensor([-100.0], dtype=dtype)
    assert hf.linear_relu(x, w, b).item() == F.relu(F.linear(x, w, b)).item() == 0.25
    assert hf.linear_leaky_relu(x, w, b, 0.5).item() == 0.25


def linear_samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    (linear,) = [op for op in op_db if op.name == "nn.functional.linear"]
    return list(linear.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("activation", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_opinfo_samples_of_linear(activation, dtype):
    """Every sample PyTorch tests F.linear with (1-D, zero-size, batched, no bias, ...)."""
    samples = linear_samples(dtype)
    assert len(samples) >= 10
    for sample in samples:
        x, (w, *rest) = sample.input, sample.args
        b = rest[0] if rest else sample.kwargs.get("bias")
        out = LAYERS[activation][0](x, w, b)
        expected = eager(activation, x, w, b)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert out.is_contiguous() and not out._is_view()
        torch.testing.assert_close(out, expected, **tolerances(dtype))
        if out.numel() == 0:
            continue
        leaves = [t for t in (x, w, b) if t is not None]
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        got = torch.autograd.grad(out, leaves, grad_output)
        want = torch.autograd.grad(expected, leaves, grad_output)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, **tolerances(dtype))
        if dtype in LOW_PRECISION:
            # Against the float64 truth, no worse than eager, give or take one rounding.
            exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
            exact_args = exact_leaves + [None] * (3 - len(exact_leaves))
            exact_out = eager(activation, *exact_args)
            truth = (exact_out, *torch.autograd.grad(exact_out, exact_leaves, grad_output.double()))
            for mine, eagers, exact in zip((out, *got), (expected, *want), truth):
                assert_as_accurate_as_eager(mine, eagers, exact)




ACTIVATION_OPS = {"nn.functional.relu": hf.relu, "nn.functional.leaky_relu": hf.leaky_relu, "sigmoid": hf.sigmoid,
                  "tanh": hf.tanh, "nn.functional.silu": hf.silu, "nn.functional.gelu": hf.gelu,
                  "nn.functional.softplus": hf.softplus}


@pytest.mark.parametrize("name", ACTIVATION_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_opinfo_samples_of_activations(name, dtype):
    """Every sample PyTorch tests the activation with (0-d, zero-size, both GELUs, softplus with
    beta=3 and threshold=0.2, ...), its arguments passed as PyTorch passes them."""
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [op for op in op_db if op.name == name and op.variant_test_name == ""]
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    for sample in samples:
        out = ACTIVATION_OPS[name](sample.input, *sample.args, **sample.kwargs)
        expected = op(sample.input, *sample.args, **sample.kwargs)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, **tolerances(dtype))
        if expected.numel():
            grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
            torch.testing.assert_close(torch.autograd.grad(out, sample.input, grad_output),
                                       torch.autograd.grad(expected, sample.input, grad_output), **tolerances(dtype))


@pytest.mark.usefixtures("cpu_capability")
def test_float32_gelu_across_its_range_is_as_close_to_float64_as_eagers():
    # handgrad's float32 erf on the CPU is a rational approximation (csrc/activation.h), eager's
    # oneDNN's: every 2e-4 from -10 to 10, the tails where erf saturates included, both
    # passes, against the float64 truth; inf and NaN where the truth has them.
    x = torch.cat([torch.linspace(-10, 10, 100_001), torch.tensor([float("inf"), -float("inf"), float("nan")])])
    grad = torch.ones_like(x)
    leaves = [x.clone().requires_grad_() for _ in range(3)]
    truth_in = x.double().requires_grad_()
    outs = [hf.gelu(leaves[0]), F.gelu(leaves[1]), F.gelu(truth_in)]
    grads = [torch.autograd.grad(out, leaf, g)[0] for out, leaf, g in
             zip(outs, [leaves[0], leaves[1], truth_in], [grad, grad, grad.double()])]
    for ours, eagers, truth in ((outs[0], outs[1], outs[2]), (grads[0], grads[1], grads[2])):
        assert torch.equal(ours.isnan(), truth.isnan()) and torch.equal(ours.isinf(), truth.isinf())
        finite = truth.isfinite()
        error = (ours.double() - truth)[finite].abs()
        eager_error = (eagers.double() - truth)[finite].abs()
        assert error.max() <= 2 * eager_error.max(), (error.max().item(), eager_error.max().item())
        assert error.mean() <= 2 * eager_error.mean(), (error.mean().item(), eager_error.mean().item())


@pytest.mark.usefixtures("cpu_capability")
def test_float32_gelu_gives_an_element_the_same_bits_in_a_vector_lane_as_alone():
    # Lanes and the scalar tail run the same e^y and Phi, operation for operation
    # (csrc/activation.h, csrc/cpu/kernels/vectorized.h): an element's value and gradient do
    # not depend on where it sits. Underflow, signed zero, the tails and NaN included.
    torch.manual_seed(0)
    x = torch.cat([torch.randn(509) * 4, torch.tensor([-20., -13.3, -13.1, 0., -0., 1e-30, 50., float("inf"), -float("inf"), float("nan")])])
    leaf = x.clone().requires_grad_()
    out = hf.gelu(leaf)
    grad = torch.autograd.grad(out, leaf, torch.ones_like(x))[0]
    for i in range(0, len(x), 7):
        alone = x[i:i + 1].clone().requires_grad_()
        alone_out = hf.gelu(alone)
        alone_grad = torch.autograd.grad(alone_out, alone, torch.ones(1))[0]
        assert torch.equal(out[i:i + 1].detach(), alone_out.detach()) or (out[i].isnan() and alone_out.isnan()).item()
        assert torch.equal(grad[i:i + 1], alone_grad) or (grad[i].isnan() and alone_grad.isnan()).item()


# --- The dtypes the kernels do not take: what torch does, with torch's own ops ---

OTHER_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]


def _same_outcome(ours, theirs):
    """ours() and theirs() give equal results, or both raise the same error."""
    try:
        expected = theirs()
    except Exception as error:  # noqa: BLE001 - the error itself is the expectation
        with pytest.raises(type(error), match=re.escape(str(error).splitlines()[0])):
            ours()
        return None
    out = ours()
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    return out, expected


def _grads_if_any(out, expected, leaves):
    leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves or not out.requires_grad or out.numel() == 0:
        return
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", ACTIVATION_OPS)
@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_opinfo_samples_of_activations_in_other_dtypes_are_torchs(name, dtype):
    """PyTorch's samples in the dtypes its op supports that handgrad's kernels do not take
    (integers and bool for relu, sigmoid and tanh, complex for sigmoid, tanh and silu): the
    same result, gradient or error as torch's, through torch's own op."""
    from torch.testing._internal.common_methods_invocations import op_db

    for op in (op for op in op_db if op.name == name):
        if dtype not in op.supported_dtypes("cpu"):
            continue
        requires_grad = dtype in op.supported_backward_dtypes("cpu")
        for sample in op.sample_inputs("cpu", dtype, requires_grad=requires_grad):
            call = lambda f, s=sample: f(s.input, *s.args, **s.kwargs)  # noqa: E731
            both = _same_outcome(lambda: call(ACTIVATION_OPS[name]), lambda: call(op))
            if both:
                _grads_if_any(*both, [sample.input])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "softplus"])
@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_opinfo_samples_of_linear_in_other_dtypes_are_torchs(activation, dtype):
    """F.linear's samples in integers and complex (torch's dtypes for it), through each fused
    layer: torch's result, gradient or error (relu of a complex number is an error there too)."""
    from torch.testing._internal.common_methods_invocations import op_db

    (linear,) = [op for op in op_db if op.name == "nn.functional.linear"]
    if dtype not in linear.supported_dtypes("cpu"):
        pytest.skip(f"F.linear does not take {dtype}")
    requires_grad = dtype in linear.supported_backward_dtypes("cpu")
    for sample in linear.sample_inputs("cpu", dtype, requires_grad=requires_grad):
        x, (w, *rest) = sample.input, sample.args
        b = rest[0] if rest else sample.kwargs.get("bias")
        both = _same_outcome(lambda: fused_layer(activation)(x, w, b), lambda: eager_layer(activation)(x, w, b))
        if both:
            _grads_if_any(*both, [x, w, b])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "gelu"])
@pytest.mark.parametrize("bias_shape,weight_shape", [((1, 3), (3, 5)), ((), (3, 5)), ((1,), (3, 5)),
                                                      ((4, 3), (3, 5)), (None, (5,)), ((), (5,)), ((2, 3), (3, 5))],
                         ids=str)
def test_what_else_f_linear_takes_is_torchs(activation, bias_shape, weight_shape):
    """F.linear's biases that broadcast to the output ((1, out), 0-D, one per row) and its 1-D
    weight (a product with one vector): torch's result and gradients, or torch's error
    ((2, 3) does not broadcast to 4 rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(weight_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = None if bias_shape is None else torch.randn(bias_shape, generator=g, dtype=torch.float64,
                                                     requires_grad=True)
    both = _same_outcome(lambda: fused_layer(activation)(x, w, b), lambda: eager_layer(activation)(x, w, b))
    if both:
        _grads_if_any(*both, [x, w, b])
