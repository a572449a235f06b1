"""The chapter's backward formulas, each computed independently with plain tensor algebra
and compared with the gradients of the extension.

Notation: f = beta + Omega h, out = a[f], l a scalar loss with dl/d(out) = g.
"""

import pytest
import torch
from samples import fused_layer

import handgrad.functional as hf

torch.manual_seed(0)
D_IN, D_OUT, BATCH = 6, 4, 8


def layer_inputs():
    h = torch.randn(BATCH, D_IN, dtype=torch.float64, requires_grad=True)
    omega = torch.randn(D_OUT, D_IN, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(D_OUT, dtype=torch.float64, requires_grad=True)
    return h, omega, beta


def derivative(activation, f, slope=0.0):
    """a'[f] from the definitions (figure 7.6, problems 7.7 and 7.10)."""
    if activation == "relu":
        return (f > 0).double()
    if activation == "leaky_relu":
        return (f > 0).double() + slope * (f <= 0).double()
    s = 1 / (1 + torch.exp(-f))
    return s * (1 - s)


LAYER_OF = {name: fused_layer(name, negative_slope=0.2) for name in ("relu", "leaky_relu", "sigmoid")}


def test_7_6_dz_dh_is_omega_transpose():
    # With slope 1, leaky ReLU is the identity, so the layer is z = beta + Omega h and its
    # Jacobian is dz_i/dh_j = Omega_ij: the book's dz/dh (laid out j by i) is Omega^T.
    h, omega, beta = layer_inputs()
    jacobian = torch.autograd.functional.jacobian(
        lambda v: hf.linear_leaky_relu(v, omega, beta, negative_slope=1.0), h[0].detach()
    )
    torch.testing.assert_close(jacobian.T, omega.detach().T)


@pytest.mark.parametrize("activation", LAYER_OF)
def test_7_6_dl_dh(activation):
    # dl/dh = Omega^T dl/df, with dl/df = g * a'[f].
    h, omega, beta = layer_inputs()
    g = torch.randn(BATCH, D_OUT, dtype=torch.float64)
    (grad_h,) = torch.autograd.grad(LAYER_OF[activation](h, omega, beta), h, g)
    f = beta + h @ omega.T
    dl_df = g * derivative(activation, f, 0.2)
    expected = torch.stack([omega.T @ dl_df[i] for i in range(BATCH)])
    torch.testing.assert_close(grad_h, expected.detach())


@pytest.mark.parametrize("activation", LAYER_OF)
def test_7_9_dl_domega_and_dl_dbeta(activation):
    # dl/dOmega = dl/df h^T, summed over the batch; dl/dbeta = dl/df, summed likewise.
    h, omega, beta = layer_inputs()
    g = torch.randn(BATCH, D_OUT, dtype=torch.float64)
    grad_omega, grad_beta = torch.autograd.grad(LAYER_OF[activation](h, omega, beta), (omega, beta), g)
    f = beta + h @ omega.T
    dl_df = (g * derivative(activation, f, 0.2)).detach()
    expected = sum(torch.outer(dl_df[i], h[i].detach()) for i in range(BATCH))
    torch.testing.assert_close(grad_omega, expected)
    torch.testing.assert_close(grad_beta, dl_df.sum(0))


@pytest.mark.parametrize("slope", [0.01, 0.2, 1.0, 0.0, -0.5, 1.5])
def test_7_10_leaky_relu_backward(slope):
    # a'[z] = 1 for z > 0 and alpha for z <= 0 (PyTorch's convention at exactly 0).
    z = torch.tensor([-3.0, -0.5, 0.0, 0.25, 4.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(hf.leaky_relu(z, slope).sum(), z)
    expected = torch.tensor([slope, slope, slope, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    # And through a fused layer, where a' is read off the output (or f, for slope < 0).
    h, omega, beta = layer_inputs()
    g = torch.randn(BATCH, D_OUT, dtype=torch.float64)
    (grad_beta,) = torch.autograd.grad(hf.linear_leaky_relu(h, omega, beta, slope), beta, g)
    f = (beta + h @ omega.T).detach()
    torch.testing.assert_close(grad_beta, (g * derivative("leaky_relu", f, slope)).sum(0))


def test_7_7_sigmoid_derivative():
    # d sig[z]/dz = sig[z] (1 - sig[z]).
    z = torch.linspace(-8, 8, 33, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(hf.sigmoid(z).sum(), z)
    s = 1 / (1 + torch.exp(-z.detach()))
    torch.testing.assert_close(grad, s * (1 - s))
