"""Property-based tests: random shapes (zero sizes too), strides, dtypes, slopes and bias
on or off, forward and backward against eager PyTorch."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import LAYOUTS, eager_activation, fused_layer, random_tensor, tolerances


ACTIVATION_NAMES = ["relu", "leaky_relu", "sigmoid"]


@settings(max_examples=150, deadline=None)
@given(
    activation=st.sampled_from(ACTIVATION_NAMES),
    batch=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    in_features=st.integers(0, 40),
    out_features=st.integers(0, 40),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 2),
    bias=st.booleans(),
    slope=st.one_of(st.sampled_from([0.0, 1.0, -1.0]), st.floats(-3, 3, allow_nan=False)),
    seed=st.integers(0, 2**16),
)
def test_fused_layers_match_eager(activation, batch, in_features, out_features, dtype, layouts,
                                  bias, slope, seed):
    x, x_leaf = random_tensor(*batch, in_features, dtype=dtype, seed=seed, layout=layouts[0])
    w, w_leaf = random_tensor(out_features, in_features, dtype=dtype, seed=seed + 1, layout=layouts[1])
    b, b_leaf = random_tensor(out_features, dtype=dtype, seed=seed + 2) if bias else (None, None)
    leaves = [t for t in (x_leaf, w_leaf, b_leaf) if t is not None]

    out = fused_layer(activation, negative_slope=slope)(x, w, b)
    # F.linear as a 2-D addmm: on an N-D input that is not contiguous, eager's F.linear takes
    # matmul and then adds the bias, rounding bfloat16/float16 twice where handgrad (and
    # eager's 2-D path) rounds once, which can flip a ReLU mask.
    rows = 1
    for size in batch:
        rows *= size
    flat = F.linear(x.reshape(rows, in_features), w, b).reshape(*batch, out_features)
    expected = eager_activation(activation, negative_slope=slope)(flat)
    tolerance = tolerances(dtype, summed=True)  # gradients may add in another order
    torch.testing.assert_close(out, expected, **tolerance)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 3)).to(dtype)
    got = torch.autograd.grad(out, leaves, grad_output, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, grad_output, allow_unused=True)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance)
