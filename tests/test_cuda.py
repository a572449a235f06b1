"""What only a GPU has: the CUDA kernels' grid of blocks and chunks and cuBLAS's choice of
algorithm over large and odd shapes, a small subset of calls for compute-sanitizer, side
streams and CUDA graphs. Skipped on machines without a GPU (benchmarks/gpu_check.sh runs
them on one).

Everything else the CUDA kernels promise (values and gradients against eager and a float64
truth, every dtype, shape and layout, NaN and Inf, gradcheck, opcheck, compile, autocast,
the MLP) is tested where the CPU's is, by concern, through the `device` fixture
(conftest.py). Tests marked `sanitizer` are small enough for compute-sanitizer's memcheck
and racecheck.
"""

import pytest
import torch
import torch.nn.functional as F
from samples import (
    tolerances,
    ONE_ACTIVATION_OF_EACH,
    ONE_LAYER_OF_EACH,
    assert_close_to_eager_gradient,
    check_layer,
    random_tensor,
)
from torch import nn

import handgrad
import handgrad.functional as hf
import handgrad.nn as hnn

pytestmark = pytest.mark.cuda
CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ops = torch.ops.handgrad
# (function, eager reference) pairs: relu, sigmoid and leaky_relu with slope 0.01.
FUSED_PAIRS = [case.values for case in ONE_LAYER_OF_EACH]
ACTIVATION_PAIRS = [case.values for case in ONE_ACTIVATION_OF_EACH]


def test_build_has_cuda_kernels():
    assert handgrad.cuda_built()


@pytest.mark.parametrize("fn,reference", ONE_LAYER_OF_EACH)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows,out_features", [(8193, 520), (20000, 64), (300, 1032), (5, 2056)],
                         ids=["8193x520", "20000x64", "300x1032", "5x2056"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "expanded", "transposed"])
def test_many_blocks_chunks_and_strided_gradients(fn, reference, dtype, rows, out_features, grad_layout):
    # Several column tiles with an uneven last one, many chunks of rows, gradients read
    # where they lie (stride 0, or transposed).
    check_layer(fn, reference, (rows, 40), out_features, dtype, "contiguous", True, "cuda", grad_layout)


@pytest.mark.sanitizer
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_ops_with_misaligned_and_strided_arguments(activation, dtype):
    # The backward ops called directly, as torch.compile may: arguments one element off
    # 16-byte alignment, transposed, expanded.
    slope = 0.1
    for rows, cols in ((33, 16), (9, 24), (130, 72)):
        base = torch.randn(rows * cols + 1, device="cuda").to(dtype)
        grad, saved = base[1:].view(rows, cols), torch.rand(rows * cols + 1, device="cuda").to(dtype)[1:].view(rows, cols)
        for g in (grad, grad.t().contiguous().t(), grad[:1].expand(rows, cols)):
            d64 = g.double() * {"relu": (saved > 0).double(), "leaky_relu": torch.where(saved > 0, 1.0, slope).double(),
                                "sigmoid": (saved.double() * (1 - saved.double()))}[activation]
            pre = ops.activation_backward(g, saved, activation, slope)
            torch.testing.assert_close(pre.double(), d64, **tolerances(dtype, summed=True))
            pre2, bias = ops.bias_activation_backward(g, saved, activation, slope)
            assert torch.equal(pre2, pre)
            torch.testing.assert_close(bias.double(), pre.double().sum(0), **tolerances(dtype, summed=True))
        x = torch.randn(rows * 8 + 1, device="cuda").to(dtype)[1:].view(rows, 8)
        w = torch.randn(cols * 8 + 1, device="cuda").to(dtype)[1:].view(cols, 8)
        grad_input, grad_weight, grad_bias = ops.linear_activation_backward(
            grad, x, w, saved, activation, slope, [True, True, True])
        pre = ops.activation_backward(grad, saved, activation, slope)
        torch.testing.assert_close(grad_input, pre @ w, **tolerances(dtype, summed=True))
        torch.testing.assert_close(grad_weight, pre.t() @ x, **tolerances(dtype, summed=True))
        torch.testing.assert_close(grad_bias.double(), pre.double().sum(0), **tolerances(dtype, summed=True))


@pytest.mark.sanitizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_kernel_path_once(dtype):
    """Small calls that reach every kernel and path: the target of compute-sanitizer."""
    for rows, inner, cols in ((3, 5, 7), (40, 16, 64), (300, 24, 264), (17, 8, 1), (0, 4, 8), (6, 0, 8)):
        for layout in ("contiguous", "offset"):
            x, _ = random_tensor(rows, inner, dtype=dtype, seed=4, device="cuda", layout=layout)
            w, _ = random_tensor(cols, inner, dtype=dtype, seed=5, device="cuda")
            b, _ = random_tensor(cols, dtype=dtype, seed=6, device="cuda", layout=layout)
            for fn, reference in FUSED_PAIRS:
                out, expected = fn(x, w, b), reference(x, w, b)
                torch.testing.assert_close(out, expected, **tolerances(dtype, summed=True))
                g = torch.randn_like(out)
                for a, e in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(expected, (x, w, b), g)):
                    assert_close_to_eager_gradient(a, e, dtype)
            for fn, reference in ACTIVATION_PAIRS:
                torch.testing.assert_close(fn(x), reference(x), **tolerances(dtype, summed=True))
            y = x.detach().clone()  # the in-place kernel, once per layout
            torch.testing.assert_close(hf.relu(y, inplace=True), F.relu(x.detach()))
    model = hnn.MLP([8, 16, 24, 4], checkpoint_every=1, device="cuda", dtype=dtype)
    out = model(torch.randn(5, 8, device="cuda", dtype=dtype, requires_grad=True))
    out.float().sum().backward()
    torch.cuda.synchronize()


def test_side_stream_gives_the_default_streams_results():
    model = make_model()
    x = torch.randn(512, 64, device="cuda")
    expected = (model(x), torch.autograd.grad(model(x).square().sum(), list(model.parameters())))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected[0])
    for a, e in zip(grads, expected[1]):
        torch.testing.assert_close(a, e)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        hnn.LinearReLU(64, 128), hnn.LinearLeakyReLU(128, 128, negative_slope=0.1),
        hnn.LinearSigmoid(128, 32), nn.Linear(32, 8), hnn.ReLU(inplace=True),
    ).cuda()


def test_cuda_graph_capture_and_replay_of_forward_and_backward():
    model = make_model()
    params = list(model.parameters())
    static_x = torch.randn(256, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up the caching allocator outside the capture
        for _ in range(3):
            torch.autograd.grad(model(static_x).square().sum(), params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_grads = torch.autograd.grad(static_out.square().sum(), params)
    for seed in (1, 2):
        static_x.copy_(torch.randn(256, 64, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        out = model(static_x)
        torch.testing.assert_close(static_out, out)
        for got, want in zip(static_grads, torch.autograd.grad(out.square().sum(), params)):
            torch.testing.assert_close(got, want)
