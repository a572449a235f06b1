"""Property-based tests: random shapes (zero sizes too), strides, dtypes, slopes and bias
on or off, forward and backward against eager PyTorch."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import handgrad.functional as hf

ACTIVATION_NAMES = ["relu", "leaky_relu", "sigmoid"]


def eager(activation, f, slope):
    if activation == "relu":
        return F.relu(f)
    if activation == "leaky_relu":
        return F.leaky_relu(f, slope)
    return torch.sigmoid(f)


def handgrad_layer(activation, x, w, b, slope):
    if activation == "relu":
        return hf.linear_relu(x, w, b)
    if activation == "leaky_relu":
        return hf.linear_leaky_relu(x, w, b, slope)
    return hf.linear_sigmoid(x, w, b)


def random(shape, dtype, g):
    return torch.randn(*shape, generator=g).to(dtype)


# Against eager: the forward rounds as eager's does; gradients may add in another order.
TOLERANCES = {torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}, torch.float16: {"rtol": 1e-2, "atol": 1e-2},
              torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-4, "atol": 1e-4}}


def make(shape, dtype, layout, seed):
    """A tensor of `shape` in the given memory layout, and the leaf its gradient reaches."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        leaf = random((*shape[:-2], shape[-1], shape[-2]), dtype, g).requires_grad_()
        return leaf.transpose(-1, -2), leaf
    if layout == "sliced":
        leaf = random((*shape[:-1], 2 * shape[-1]), dtype, g).requires_grad_()
        return leaf[..., ::2], leaf
    leaf = random(tuple(shape), dtype, g).requires_grad_()
    return leaf, leaf


@settings(max_examples=150, deadline=None)
@given(
    activation=st.sampled_from(ACTIVATION_NAMES),
    batch=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    in_features=st.integers(0, 40),
    out_features=st.integers(0, 40),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    layouts=st.tuples(*[st.sampled_from(["contiguous", "transposed", "sliced"])] * 2),
    bias=st.booleans(),
    slope=st.one_of(st.sampled_from([0.0, 1.0, -1.0]), st.floats(-3, 3, allow_nan=False)),
    seed=st.integers(0, 2**16),
)
def test_fused_layers_match_eager(activation, batch, in_features, out_features, dtype, layouts,
                                  bias, slope, seed):
    x, x_leaf = make((*batch, in_features), dtype, layouts[0], seed)
    w, w_leaf = make((out_features, in_features), dtype, layouts[1], seed + 1)
    b, b_leaf = make((out_features,), dtype, "contiguous", seed + 2) if bias else (None, None)
    leaves = [t for t in (x_leaf, w_leaf, b_leaf) if t is not None]

    out = handgrad_layer(activation, x, w, b, slope)
    # F.linear as a 2-D addmm: on an N-D input that is not contiguous, eager's F.linear takes
    # matmul and then adds the bias, rounding bfloat16/float16 twice where handgrad (and
    # eager's 2-D path) rounds once, which can flip a ReLU mask.
    rows = 1
    for size in batch:
        rows *= size
    flat = F.linear(x.reshape(rows, in_features), w, b).reshape(*batch, out_features)
    expected = eager(activation, flat, slope)
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, **tolerance)
    grad_output = random(out.shape, dtype, torch.Generator().manual_seed(seed + 3))
    got = torch.autograd.grad(out, leaves, grad_output, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, grad_output, allow_unused=True)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance)
