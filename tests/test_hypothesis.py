"""Property-based tests: random shapes (zero sizes too), strides, dtypes, slopes and bias
on or off, forward and backward against eager PyTorch; random networks through the one op
against eager and a float64 truth."""

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from samples import (
    LAYOUTS,
    assert_as_accurate_as_eager,
    eager_activation,
    eager_network,
    fused_layer,
    leaves,
    num_threads,
    random_tensor,
    slack,
    tolerances,
)

import handgrad.functional as hf


ALL_ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh", "softplus"]


@settings(max_examples=150, deadline=None)
@given(
    activation=st.sampled_from(ALL_ACTIVATIONS),
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


# Widths and rows on both sides of the engine's choices (csrc/cpu/kernels/blas_network.cpp,
# engine.h): small weights, blocks of rows, several gradient slots (from 8 blocks), the
# transposed forward of 16-64 rows, BLAS's products, widths that are no multiple of a vector.
NETWORK_WIDTHS = [1, 3, 8, 17, 40, 64, 65, 129, 256, 300]
HIDDEN_WIDTHS = NETWORK_WIDTHS[1:]  # a hidden width of 1: tests/test_fused_mlp.py's fixed "odd" network
NETWORK_ROWS = [0, 1, 5, 16, 17, 40, 64, 65, 257, 700, 2100]
KINKED = ("relu", "leaky_relu")


@settings(max_examples=150, deadline=None)
@given(
    widths=st.tuples(st.sampled_from(NETWORK_WIDTHS), st.lists(st.sampled_from(HIDDEN_WIDTHS), max_size=3),
                     st.sampled_from(NETWORK_WIDTHS)).map(lambda w: [w[0], *w[1], w[2]]),
    rows=st.sampled_from(NETWORK_ROWS),
    activation=st.sampled_from(ALL_ACTIVATIONS),
    output_activation=st.sampled_from([None, *ALL_ACTIVATIONS]),
    slope=st.sampled_from([0.01, -0.2, 1.0]),
    softplus=st.sampled_from([(1.0, 20.0), (2.0, 20.0), (2.0, 1.0)]),
    checkpoint_every=st.sampled_from([None, 1, 2]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_networks_are_as_close_to_float64_as_eagers(widths, rows, activation, output_activation, slope,
                                                           softplus, checkpoint_every, bias, dtype, threads, seed):
    # The op picks its path (engine, transposed forward, BLAS, a chain of layers) from the
    # shape, the activations, checkpointing and the thread count; every path is held to a
    # float64 truth, more loosely than tests/test_fused_mlp.py's fixed networks (2 times
    # eager's error). Through narrow layers and few rows a gradient's error is set by a
    # handful of sums, some ill-conditioned, and which side rounds luckier is chance: 64-3-3-64
    # GELU at 1 row read 4.1 times eager's 1.2e-7; with a hidden width of 1 (left to the fixed
    # "odd" network), bfloat16 at 5 rows, handgrad's error was 0.8 of eager's at the median of
    # 200 seeds and up to 3.2 times it. A wrong path or parameter is off by far more.
    allowed = dict(factor=4, extra=max(slack(dtype), 16 * torch.finfo(torch.float32).eps))
    beta, threshold = softplus
    # Below float64, only where a' has no kink and softplus no jump (at a threshold of 1, 0.31):
    # among a network's many f, one within a rounding of the kink takes the other side in one
    # of handgrad and eager (2,100 x 300 ReLU outputs: one, 5e-4 of every gradient), which
    # no bound on the error can tell from a wrong result. tests/test_fused_mlp.py's fixed
    # networks hold ReLU and LeakyReLU in every dtype.
    used = (activation, output_activation)
    kinked = any(a in KINKED for a in used) or ("softplus" in used and threshold < 20)
    assume(dtype == torch.float64 or not kinked)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, widths[0], generator=g)
    weights = [torch.randn(o, i, generator=g) / i ** 0.5 for i, o in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(o, generator=g) for o in widths[1:]] if bias else []
    grad_output = torch.randn(rows, widths[-1], generator=g).to(dtype)
    values = [t.to(dtype) for t in (x, *weights, *biases)]
    n = len(weights)

    def network(fn, args, **kwargs):
        return fn(args[0], args[1:n + 1], args[n + 1:], activation, slope, output_activation=output_activation,
                  beta=beta, threshold=threshold, **kwargs)

    with num_threads(threads):
        ours_args, eager_args = leaves(values), leaves(values)
        truth_args = leaves([t.double() for t in values])
        out = network(hf.mlp, ours_args, checkpoint_every=checkpoint_every)
        expected = network(eager_network, eager_args)
        truth = network(eager_network, truth_args, stored_as=dtype)
        assert out.dtype == dtype
        assert_as_accurate_as_eager(out, expected, truth, **allowed)
        for got, want, true in zip(torch.autograd.grad(out, ours_args, grad_output),
                                   torch.autograd.grad(expected, eager_args, grad_output),
                                   torch.autograd.grad(truth, truth_args, grad_output.double())):
            assert_as_accurate_as_eager(got, want, true, **allowed)
