"""gradcheck and gradgradcheck in float64 for every op: with and without bias, 1-D, 2-D and
3-D inputs, every slope of samples.SLOPES, and every mode (forward AD, batched, forward over
reverse)."""

import pytest
import torch
from samples import ACTIVATIONS, FUSED_LAYERS
from torch.autograd import gradcheck, gradgradcheck

import handgrad.functional as hf

SHAPES = {"1d": (5,), "2d": (4, 5), "3d": (2, 3, 5)}


def double(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("fn,_", FUSED_LAYERS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fused_gradcheck_and_gradgradcheck(fn, _, shape, bias):
    x, w = double(*shape, seed=1), double(3, 5, seed=2)
    b = double(3, seed=3) if bias else None
    args = (x, w, b) if bias else (x, w)

    def layer(*args):
        return fn(args[0], args[1], args[2] if bias else None)

    assert gradcheck(layer, args)
    assert gradgradcheck(layer, args)


@pytest.mark.parametrize("fn,_", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_activation_gradcheck_and_gradgradcheck(fn, _, shape):
    x = double(*shape, seed=4)
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid"])
def test_ops_gradcheck_directly(activation):
    # The ops carry the same autograd as the Functions, for callers of torch.ops.handgrad.
    x, w, b = double(4, 5, seed=5), double(3, 5, seed=6), double(3, seed=7)
    op = torch.ops.handgrad
    assert gradgradcheck(lambda *a: op.linear_activation(*a, activation, 0.2), (x, w, b))
    assert gradgradcheck(lambda t: op.activation(t, activation, -0.3), (x,))
    saved = hf.sigmoid(double(4, 3, seed=8)).detach().requires_grad_()
    grad_output = double(4, 3, seed=9)
    assert gradcheck(lambda g, s: op.activation_backward(g, s, activation, 0.2), (grad_output, saved))
    assert gradcheck(lambda g, s: op.bias_activation_backward(g, s, activation, 0.2), (grad_output, saved))


@pytest.mark.parametrize("fn,_", FUSED_LAYERS)
def test_fused_gradcheck_with_forward_ad_and_batched_grad(device, fn, _):
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(fn, (x, w, b), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(fn, (x, w, b))


# Every mode of gradcheck: forward AD, backward, batched (vmap) and forward-over-reverse.
FULL_CHECKS = dict(check_forward_ad=True, check_backward_ad=True, check_batched_grad=True,
                   check_batched_forward_grad=True)


@pytest.mark.parametrize("fn,_", FUSED_LAYERS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fused_gradcheck_every_mode(fn, _, bias):
    args = [double(2, 3, 5, seed=1), double(4, 5, seed=2)]
    if bias:
        args.append(double(4, seed=3))
    layer = (lambda x, w, b: fn(x, w, b)) if bias else (lambda x, w: fn(x, w, None))
    assert gradcheck(layer, args, **FULL_CHECKS)
    assert gradgradcheck(layer, args, check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("fn,_", ACTIVATIONS)
def test_activation_gradcheck_every_mode(fn, _):
    x = double(3, 7, seed=5)
    assert gradcheck(fn, (x,), **FULL_CHECKS)
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True, check_batched_grad=True)
