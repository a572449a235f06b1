"""Forward and every gradient equal eager PyTorch, for every op, dtype, shape and stride."""

import pytest
import torch
from samples import (
    ACTIVATION,
    ACTIVATIONS,
    DTYPES,
    FUSED_LAYERS,
    LAYOUTS,
    NAME,
    NOT_EAGERS_BITS,
    ONE_LAYER_OF_EACH,
    assert_as_accurate_as_eager,
    check_layer,
    grads,
    num_threads,
    random_tensor,
    same_bits_for_every_thread_count,
    tolerances,
)

import handgrad
import handgrad.functional as hf

ops = torch.ops.handgrad


# The layer's argument cases: an input shape, and each argument's layout (samples.LAYOUTS).
LINEAR_CASES = {
    "2d": ((7,), {}), "1d": ((), {}), "3d": ((2, 3), {}), "4d": ((2, 1, 3), {}),
    "transposed": ((7,), {"x": "transposed", "w": "transposed"}),
    "sliced": ((5,), {"x": "sliced", "b": "sliced"}),
    "offset": ((7,), {"x": "offset", "w": "offset", "b": "offset"}),
    "expanded": ((6,), {"x": "expanded"}),
    "empty_batch": ((0,), {}), "empty_3d": ((2, 0), {}),
    "zero_features": ((5,), {}), "zero_outputs": ((5,), {}),
}


def make_linear_inputs(case, dtype, in_features=12, out_features=9, bias=True, seed=0, integers=False):
    """(input, weight, bias, leaves): the arguments of LINEAR_CASES[case], and the leaf
    tensors whose gradients are compared."""
    batch, layouts = LINEAR_CASES[case]
    K = 0 if case == "zero_features" else in_features
    M = 0 if case == "zero_outputs" else out_features

    def make(name, *shape, seed):
        return random_tensor(*shape, dtype=dtype, seed=seed, layout=layouts.get(name, "contiguous"), integers=integers)

    leaves = {}
    x, leaves["x"] = make("x", *batch, K, seed=seed)
    w, leaves["w"] = make("w", M, K, seed=seed + 1)
    b = None
    if bias:
        b, leaves["b"] = make("b", M, seed=seed + 2)
    return x, w, b, leaves




@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fused_matches_eager(fn, reference, dtype, case, bias):
    x, w, b, leaves = make_linear_inputs(case, dtype, bias=bias)
    out = fn(x, w, b)
    expected = reference(x, w, b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))

    grad_output = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    leaf_list = list(leaves.values())
    for got, want in zip(grads(out, leaf_list, grad_output), grads(expected, leaf_list, grad_output)):
        torch.testing.assert_close(got, want, **tolerances(dtype))


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kinks_match_eager(fn, reference, dtype):
    # Integer data hits f = 0 exactly: a'(0) must be eager's (0 for ReLU, the slope for
    # LeakyReLU), and every value is exact, so forward and gradients agree bit for bit.
    x, w, b, leaves = make_linear_inputs("3d", dtype, integers=True, seed=4)  # f = 0 three times
    out, expected = fn(x, w, b), reference(x, w, b)
    no_kink = NAME[fn] == "linear_sigmoid" or NAME[fn].startswith("linear_softplus")  # and never 0
    assert (expected == 0).any() or no_kink
    torch.testing.assert_close(out, expected, **({"rtol": 0, "atol": 0} if NAME[fn] not in NOT_EAGERS_BITS
                                                 else tolerances(dtype)))
    g = torch.randint(-2, 3, out.shape).to(dtype)
    leaf_list = list(leaves.values())
    for got, want in zip(grads(out, leaf_list, g), grads(expected, leaf_list, g)):
        torch.testing.assert_close(got, want, **tolerances(dtype))


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (3, 0, 4), (), (1000,), (2, 3, 37)], ids=str)
@pytest.mark.usefixtures("cpu_capability")
def test_activation_matches_eager(fn, reference, dtype, shape):
    x = torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_()
    out, expected = fn(x), reference(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad_output = torch.randn(shape, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(
        grads(out, [x], grad_output)[0], grads(expected, [x], grad_output)[0], **tolerances(dtype)
    )


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
def test_activation_of_strided_input(fn, reference):
    base = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    for x in (base.t(), base[:, ::3], base[:1].expand(4, 10)):
        torch.testing.assert_close(fn(x), reference(x))
        torch.testing.assert_close(
            torch.autograd.grad(fn(x).sum(), base)[0],
            torch.autograd.grad(reference(x).sum(), base)[0],
        )


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
def test_expanded_grad_output(fn, reference):
    # out.sum().backward() hands the backward a stride-0 gradient.
    x, w, b, leaves = make_linear_inputs("3d", torch.float64)
    got = torch.autograd.grad(fn(x, w, b).sum(), list(leaves.values()))
    want = torch.autograd.grad(reference(x, w, b).sum(), list(leaves.values()))
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("requires", ["x", "w", "b", "xw"])
def test_partial_requires_grad(fn, reference, requires):
    x, w, b, _ = make_linear_inputs("2d", torch.float64)
    x, w, b = (t.detach().requires_grad_(name in requires) for t, name in ((x, "x"), (w, "w"), (b, "b")))
    wanted = [t for t in (x, w, b) if t.requires_grad]
    got = torch.autograd.grad(fn(x, w, b).sum(), wanted)
    want = torch.autograd.grad(reference(x, w, b).sum(), wanted)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("rows,in_features,out_features", [(64, 96, 80), (513, 33, 257), (4096, 8, 3)])
@pytest.mark.parametrize("fn,reference", ONE_LAYER_OF_EACH)
@pytest.mark.usefixtures("cpu_capability")
def test_larger_shapes_cross_thread_and_vector_boundaries(rows, in_features, out_features, fn, reference):
    torch.manual_seed(1)
    x = torch.randn(rows, in_features, requires_grad=True)
    w = torch.randn(out_features, in_features, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True)
    out, expected = fn(x, w, b), reference(x, w, b)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for got, want in zip(grads(out, [x, w, b], g), grads(expected, [x, w, b], g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kinks_follow_pytorch():
    # ReLU'(0) = 0 and LeakyReLU'(0) = negative_slope, as in PyTorch (not the book's 0).
    zero = torch.zeros(3, requires_grad=True)
    assert torch.equal(torch.autograd.grad(hf.relu(zero).sum(), zero)[0], torch.zeros(3))
    assert torch.equal(
        torch.autograd.grad(hf.leaky_relu(zero, 0.3).sum(), zero)[0], torch.full((3,), 0.3)
    )


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("shape", [(10, 10, 40), (100, 40, 40), (7, 1, 5), (256, 512, 512), (3000, 64, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("cpu_capability")
def test_layers_are_as_close_to_float64_as_eager(fn, reference, shape, dtype):
    # handgrad's own products add in another order than eager's BLAS: not the same bits,
    # but no farther from the truth, output and every gradient.
    N, K, M = shape
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in ((N, K), (M, K), (M,)))
    truth_args = [t.detach().double().requires_grad_() for t in (x, w, b)]
    out, expected, truth = fn(x, w, b), reference(x, w, b), reference(*truth_args)
    assert_as_accurate_as_eager(out, expected, truth)
    grad_output = torch.randn(N, M, generator=g).to(dtype)
    for got, want, true in zip(grads(out, [x, w, b], grad_output), grads(expected, [x, w, b], grad_output),
                               grads(truth, truth_args, grad_output.double())):
        assert_as_accurate_as_eager(got, want, true)


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [33, 400, 1000, 100_003])
def test_activations_are_eagers_to_the_last_bit(fn, reference, dtype, numel):
    # The same formula, walked over memory as ATen's elementwise kernels walk it (pairs of
    # SIMD registers, then single elements): the same values and gradients, bit for bit.
    g = torch.Generator().manual_seed(numel)
    x = (4 * torch.randn(numel, generator=g)).to(dtype).requires_grad_()
    out, expected = fn(x), reference(x)
    grad_output = torch.randn(numel, generator=g).to(dtype)
    got, want = grads(out, [x], grad_output)[0], grads(expected, [x], grad_output)[0]
    if NAME[fn] in NOT_EAGERS_BITS:
        x64 = x.detach().double().requires_grad_()
        truth = reference(x64)
        assert_as_accurate_as_eager(out, expected, truth)
        assert_as_accurate_as_eager(got, want, grads(truth, [x64], grad_output.double())[0])
        return
    assert torch.equal(out, expected)
    if dtype == torch.float16 and fn is ACTIVATION["sigmoid"][0]:
        # Eager's CPU float16 sigmoid backward rounds to float16 after each operation;
        # handgrad rounds once, from float32. Not the same bits: closer to the truth.
        s, g64 = expected.detach().double(), grad_output.double()
        truth = g64 * (1 - s) * s
        assert (got.double() - truth).abs().max() <= (want.double() - truth).abs().max()
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_activations_are_eagers_to_the_last_bit_on_any_thread_count(threads):
    # Eager's threads each walk their own piece, pairs of registers then a scalar tail;
    # handgrad cuts the same pieces (and keeps them without OpenMP), so the tails match.
    with num_threads(threads):
        x = 4 * torch.randn(100_003, generator=torch.Generator().manual_seed(threads))
        for name in ("sigmoid", "relu"):
            fn, reference = ACTIVATION[name]
            assert torch.equal(fn(x), reference(x)), f"{name} on {threads} threads"


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 16), (12,), (0, 12), (1000, 64)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "transposed"])
@pytest.mark.parametrize("out_features", [9, 16])  # 16: whole 16-byte packs per row
@pytest.mark.parametrize("bias", [True, False])
def test_fused_against_eager_and_float64_truth(device, fn, reference, dtype, shape, layout, out_features, bias):
    # Misaligned ("offset") and transposed arguments, 16-byte packs and scalar tails.
    check_layer(fn, reference, shape, out_features, dtype, layout, bias, device)


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [*LAYOUTS, "channels_last"])
def test_activation_layouts_match_eager(device, fn, reference, dtype, layout):
    if layout == "channels_last":  # a memory format of 4-D tensors, which eager's output keeps
        leaf = torch.randn(2, 3, 5, 7, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        leaf.requires_grad_()
        x = leaf
    else:
        x, leaf = random_tensor(37, 41, dtype=dtype, seed=3, device=device, layout=layout)
    out, expected = fn(x), reference(x)
    assert out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, **tolerances(dtype, summed=True))
    g = torch.randn(out.shape, device=device).to(dtype)
    torch.testing.assert_close(torch.autograd.grad(out, leaf, g)[0],
                               torch.autograd.grad(expected, leaf, g)[0], **tolerances(dtype, summed=True))


NON_FINITE = [[1.0, float("nan"), 0.5], [float("inf"), -2.0, 1.0], [-float("inf"), 0.0, 3.0]]


def _eager_side(fn, *tensors):
    """The tensors eager is given: as they are, or in float64 for the activations held to
    eager's accuracy rather than its bits. Eager's float32 GELU is oneDNN's, which differs at
    +-inf from eager's own formula (x86: NaN at +inf; aarch64: gradients +-inf); that formula,
    eager's float64 GELU, is the one."""
    if NAME[fn] not in NOT_EAGERS_BITS:
        return tensors
    return tuple(None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors)


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
def test_nan_and_inf_propagate_through_activations_as_in_eager(device, fn, reference):
    x = torch.tensor([float("nan"), -1.0, 0.0, 2.0, float("inf"), -float("inf")], device=device, requires_grad=True)
    g = torch.tensor([1.0, float("nan"), 1.0, float("nan"), 1.0, 1.0], device=device)
    (eager,) = _eager_side(fn, x)
    torch.testing.assert_close(fn(x), reference(eager).to(x.dtype), equal_nan=True)
    torch.testing.assert_close(torch.autograd.grad(fn(x), x, g)[0],
                               torch.autograd.grad(reference(eager), eager, g.to(eager.dtype))[0].to(x.dtype),
                               equal_nan=True)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_nan_and_inf_propagate_through_fused_layers_as_in_eager(device, fn, reference, bias):
    # The fourth output mixes two inputs: NaN and inf reach it through the product.
    x = torch.tensor(NON_FINITE, device=device, requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], device=device)
    b = torch.full((4,), 0.5, device=device) if bias else None
    eager = _eager_side(fn, x, w, b)
    out, expected = fn(x, w, b), reference(*eager)
    torch.testing.assert_close(out, expected.to(out.dtype), equal_nan=True)
    g = torch.tensor([[1.0, 1.0, float("nan"), 1.0]] * 3, device=device)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(expected, eager[0], g.to(expected.dtype))[0].to(x.dtype),
                               equal_nan=True)


def test_sigmoid_extremes_match_eager_and_give_no_nan(device):
    x = torch.tensor([[-1000.0, 1000.0, -88.0, 89.0, 0.0]], device=device, requires_grad=True)
    for out in (hf.sigmoid(x), hf.linear_sigmoid(x, torch.eye(5, device=device), None)):
        torch.testing.assert_close(out, torch.sigmoid(x.detach()))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert not torch.isnan(out).any() and not torch.isnan(grad).any()
        torch.testing.assert_close(grad, torch.autograd.grad(torch.sigmoid(x).sum(), x)[0])
    nan = torch.tensor([float("nan")], device=device)
    assert torch.isnan(hf.sigmoid(nan)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(100_000, 48), (8193, 520), (7, 3)])
@pytest.mark.usefixtures("cpu_capability")
def test_bias_gradient_is_bitwise_deterministic_and_right(device, dtype, rows, cols):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 32, generator=g).to(device, dtype)
    w = (torch.randn(cols, 32, generator=g) / 32**0.5).to(device, dtype)
    b = torch.randn(cols, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(rows, cols, generator=g).to(device, dtype)
    out = hf.linear_sigmoid(x, w, b)
    first = torch.autograd.grad(out, b, grad)[0]
    blas = device != "cpu" or handgrad._C.cpu_products_go_to_blas(rows, [w], "sigmoid", 0.0, 0, "sigmoid", True)
    same_bits_for_every_thread_count(hf.linear_sigmoid, [x, w, b], grad, blas=blas)
    # Against the float64 sum of the same dl/df: as close as eager's grad.sum(0).
    grad_pre = ops.activation_backward(grad, out.detach(), "sigmoid", 0.0)
    truth = grad_pre.double().sum(0)
    eager = grad_pre.sum(0)
    assert_as_accurate_as_eager(first, eager, truth)
