"""The CUDA kernels: the same guarantees as the CPU path. Skipped on machines without a GPU
(benchmarks/gpu_check.sh runs them on one)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ACTIVATIONS, FUSED
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import handgrad
import handgrad.functional as hf
import handgrad.nn as hnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def test_build_has_cuda_kernels():
    assert handgrad.cuda_built()


def cuda_tensor(*shape, dtype, seed, layout="contiguous"):
    """A CUDA leaf and the tensor of `shape` seen through it. Half types hold small integers,
    exact in every product. "offset" is contiguous but starts one element into its storage,
    so the 16-byte vector accesses do not apply and the scalar paths run."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape) + (layout == "offset")
    if dtype in (torch.float16, torch.bfloat16):
        t = torch.randint(-3, 4, (numel,), generator=g).to(dtype)
    else:
        t = torch.randn(numel, generator=g, dtype=dtype)
    leaf = t.cuda().requires_grad_()
    return (leaf[1:] if layout == "offset" else leaf).view(shape), leaf


@pytest.mark.parametrize("fn,reference", FUSED)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 16), (12,), (0, 12), (1000, 64)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
@pytest.mark.parametrize("out_features", [9, 16])  # 16: whole 16-byte packs per row
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_eager_on_cuda(fn, reference, dtype, shape, layout, out_features, bias):
    x, x_leaf = cuda_tensor(*shape, dtype=dtype, seed=0, layout=layout)
    w, w_leaf = cuda_tensor(out_features, shape[-1], dtype=dtype, seed=1)
    b, b_leaf = cuda_tensor(out_features, dtype=dtype, seed=2, layout=layout) if bias else (None, None)
    leaves = [t for t in (x_leaf, w_leaf, b_leaf) if t is not None]
    out, expected = fn(x, w, b), reference(x, w, b)
    assert out.dtype == expected.dtype and out.device == expected.device
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(out, expected, **tolerance)
    g = torch.randn(out.shape, dtype=torch.float64).round().to(dtype).cuda()
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g)):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_activation_matches_eager_on_cuda(fn, reference, dtype, layout):
    x, leaf = cuda_tensor(37, 41, dtype=dtype, seed=3, layout=layout)
    torch.testing.assert_close(fn(x), reference(x))
    g = torch.randn(x.shape, device="cuda").to(dtype)
    torch.testing.assert_close(torch.autograd.grad(fn(x), leaf, g)[0],
                               torch.autograd.grad(reference(x), leaf, g)[0])


@pytest.mark.parametrize("fn,_", FUSED)
def test_gradcheck_and_gradgradcheck_on_cuda(fn, _):
    x = torch.randn(2, 3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert gradcheck(fn, (x, w, b), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("activation,slope", [("relu", 0.0), ("leaky_relu", -0.5), ("sigmoid", 0.0)])
def test_opcheck_on_cuda(activation, slope):
    ops = torch.ops.handgrad

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, device="cuda", requires_grad=True)

    torch.library.opcheck(ops.linear_activation.default, (t(4, 5), t(3, 5), t(3), activation, slope))
    torch.library.opcheck(ops.activation.default, (t(3, 4), activation, slope))
    saved = torch.rand(6, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.activation_backward.default, (t(6, 3), saved, activation, slope))
    torch.library.opcheck(ops.bias_activation_backward.default, (t(6, 3), saved, activation, slope))
    plain = [a.detach() for a in (t(6, 3), t(6, 5), t(3, 5), saved)]
    torch.library.opcheck(ops.linear_activation_backward.default,
                          (*plain, activation, slope, [True, True, True]))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        hnn.LinearReLU(64, 128), hnn.LinearLeakyReLU(128, 128, negative_slope=0.1),
        hnn.LinearSigmoid(128, 32), nn.Linear(32, 8), hnn.ReLU(),
    ).cuda()


def test_compile_fullgraph_parity_on_cuda():
    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x))
    params = [x, *model.parameters()]
    for got, want in zip(torch.autograd.grad(compiled(x).sum(), params),
                         torch.autograd.grad(model(x).sum(), params)):
        torch.testing.assert_close(got, want)


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


def test_bias_gradient_is_bitwise_deterministic():
    x = torch.randn(100_000, 64, device="cuda")
    w = torch.randn(48, 64, device="cuda")
    b = torch.randn(48, device="cuda", requires_grad=True)
    g = torch.randn(100_000, 48, device="cuda")
    first = torch.autograd.grad(hf.linear_sigmoid(x, w, b), b, g)[0]
    for _ in range(3):
        assert torch.equal(torch.autograd.grad(hf.linear_sigmoid(x, w, b), b, g)[0], first)


def test_device_mismatch_names_both_devices():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"weight is on cuda:0 but input is on cpu"):
        hf.linear_relu(x, torch.randn(3, 5, device="cuda"))
    with pytest.raises(RuntimeError, match=r"bias is on cpu but input is on cuda:0"):
        hf.linear_relu(x.cuda(), torch.randn(3, 5, device="cuda"), torch.randn(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn,reference", FUSED[:3])
def test_autocast_on_cuda_matches_nn_linear(dtype, fn, reference):
    x = torch.randn(8, 16, device="cuda", requires_grad=True)
    w = torch.randn(4, 16, device="cuda", requires_grad=True)
    b = torch.randn(4, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out, expected = fn(x, w, b), reference(x, w, b)
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_sigmoid_extremes_on_cuda():
    x = torch.tensor([-1000.0, 1000.0, float("nan")], device="cuda")
    torch.testing.assert_close(hf.sigmoid(x), torch.sigmoid(x), equal_nan=True)
