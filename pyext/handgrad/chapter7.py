"""The backpropagation chapter of "Understanding Deep Learning" as checked code.

Every closed form is written out directly from the chain rule, with no autograd inside;
tests/test_chapter7.py checks each against torch autograd (reverse and forward mode) in
float64. docs/chapter7.md gives the answers, where the worked answers in circulation go
wrong, and which test checks what.

Conventions: a[.] is ReLU with a'(z) = I[z > 0], so a'(0) = 0 as in PyTorch.
"""

import torch

# --- Problem 7.1: a network with two hidden layers of two ReLU units, one input, one output ---

PARAMS_7_1 = [
    "phi0", "phi1", "phi2",
    "psi01", "psi11", "psi21", "psi02", "psi12", "psi22",
    "theta01", "theta11", "theta02", "theta12",
]


def _relu(z):
    # torch.relu, not clamp(min=0): clamp's autograd derivative at 0 is 1, relu's is 0, the
    # I[z > 0] of the closed forms below.
    return torch.relu(z)


def _step(z):
    """I[z > 0], the derivative of ReLU."""
    return (z > 0).to(z.dtype)


def _two_layer_parts(x, p):
    # First hidden layer: h1 = a[theta01 + theta11 x], h2 = a[theta02 + theta12 x].
    z1 = p["theta01"] + p["theta11"] * x
    z2 = p["theta02"] + p["theta12"] * x
    h1, h2 = _relu(z1), _relu(z2)
    # Second hidden layer: g_k = psi0k + psi1k h1 + psi2k h2, then a[g_k].
    g1 = p["psi01"] + p["psi11"] * h1 + p["psi21"] * h2
    g2 = p["psi02"] + p["psi12"] * h1 + p["psi22"] * h2
    return z1, z2, h1, h2, g1, g2


def two_layer_net(x, p):
    """y = phi0 + phi1 a[g1] + phi2 a[g2] (problem 7.1); p maps each name to a tensor."""
    _, _, _, _, g1, g2 = _two_layer_parts(x, p)
    return p["phi0"] + p["phi1"] * _relu(g1) + p["phi2"] * _relu(g2)


def two_layer_derivatives(x, p):
    """dy/d(name) for all 13 parameters of problem 7.1, written out directly."""
    z1, z2, h1, h2, g1, g2 = _two_layer_parts(x, p)
    one = torch.ones_like(two_layer_net(x, p))
    j1 = p["phi1"] * _step(g1)  # dy/dg1
    j2 = p["phi2"] * _step(g2)  # dy/dg2
    dy_dz1 = (j1 * p["psi11"] + j2 * p["psi12"]) * _step(z1)  # h1 feeds both g1 and g2
    dy_dz2 = (j1 * p["psi21"] + j2 * p["psi22"]) * _step(z2)
    derivatives = {
        "phi0": one,
        "phi1": _relu(g1),
        "phi2": _relu(g2),
        "psi01": j1,
        "psi11": j1 * h1,
        "psi21": j1 * h2,
        "psi02": j2,
        "psi12": j2 * h1,
        "psi22": j2 * h2,
        "theta01": dy_dz1,
        "theta11": dy_dz1 * x,
        "theta02": dy_dz2,
        "theta12": dy_dz2 * x,
    }
    return {name: value * one for name, value in derivatives.items()}


# --- Problem 7.2: the toy chain of section 7.3 ---


def toy_chain(x, y, beta, omega):
    """The forward pass: every intermediate and the loss l = (f3 - y)^2."""
    f0 = beta[0] + omega[0] * x
    h1 = torch.sin(f0)
    f1 = beta[1] + omega[1] * h1
    h2 = torch.exp(f1)
    f2 = beta[2] + omega[2] * h2
    h3 = torch.cos(f2)
    f3 = beta[3] + omega[3] * h3
    return {"f0": f0, "h1": h1, "f1": f1, "h2": h2, "f2": f2, "h3": h3, "f3": f3,
            "l": (f3 - y) ** 2}


def toy_chain_derivatives(x, y, beta, omega):
    """dl/d(node) for f3, h3, f2, h2, f1, h1, f0, each from the one after it."""
    v = toy_chain(x, y, beta, omega)
    d = {"f3": 2 * (v["f3"] - y)}  # the target belongs here: l = (f3 - y)^2
    d["h3"] = omega[3] * d["f3"]
    d["f2"] = -torch.sin(v["f2"]) * d["h3"]
    d["h2"] = omega[2] * d["f2"]
    d["f1"] = torch.exp(v["f1"]) * d["h2"]
    d["h1"] = omega[1] * d["f1"]
    d["f0"] = torch.cos(v["f0"]) * d["h1"]
    return d


# --- Problems 7.12 and 7.13: y = exp[exp x + exp(x)^2] + sin[exp x + exp(x)^2] ---


def graph_7_12(x):
    f1 = torch.exp(x)
    f2 = f1**2
    f3 = f1 + f2
    f4 = torch.exp(f3)
    f5 = torch.sin(f3)
    return {"f1": f1, "f2": f2, "f3": f3, "f4": f4, "f5": f5, "y": f4 + f5}


def reverse_mode(x):
    """dy/d(node), from the output back (problem 7.12)."""
    v = graph_7_12(x)
    d = {"f5": torch.ones_like(x), "f4": torch.ones_like(x)}
    d["f3"] = d["f4"] * torch.exp(v["f3"]) + d["f5"] * torch.cos(v["f3"])
    d["f2"] = d["f3"]  # f3 = f1 + f2
    d["f1"] = d["f3"] + d["f2"] * 2 * v["f1"]  # f1 reaches y through f3 directly and via f2
    d["x"] = d["f1"] * torch.exp(x)
    return d


def forward_mode(x):
    """d(node)/dx, from the input forward (problem 7.13)."""
    v = graph_7_12(x)
    d = {"f1": torch.exp(x)}
    d["f2"] = 2 * v["f1"] * d["f1"]
    d["f3"] = d["f1"] + d["f2"]
    d["f4"] = torch.exp(v["f3"]) * d["f3"]
    d["f5"] = torch.cos(v["f3"]) * d["f3"]
    d["y"] = d["f4"] + d["f5"]
    return d


# --- Problem 7.8: step activations pass no gradient back ---


def heaviside(z):
    """Heaviside[z] = I[z >= 0]. Its derivative is 0 wherever it exists, so autograd sees a
    constant: no gradient flows back through it."""
    return (z >= 0).to(z.dtype)


def rect(z):
    """rect[z] = I[0 <= z <= 1], likewise flat wherever it has a derivative."""
    return ((z >= 0) & (z <= 1)).to(z.dtype)


def train_with_step_activation(activation=heaviside, steps=200, seed=0):
    """Train a 1-20-20-1 network whose hidden units are `activation` on a smooth target by
    gradient descent: (first loss, last loss, {parameter: largest |gradient| seen, or None
    where autograd gave none}).

    The step functions are comparisons, which autograd does not differentiate: it cuts the
    graph there and returns no gradient (None) for every parameter before them, which is
    right where the derivative exists (it is 0). Only the output layer receives gradient,
    and it does learn: the hidden layers act as fixed random features."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 20, 20, 1]
    params = {}
    for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"omega{k}"] = (torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5).requires_grad_()
        params[f"beta{k}"] = (0.5 * torch.randn(d_out, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.linspace(-2, 2, 100, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(2 * x) + 0.5 * x

    def network(x):
        h = x
        for k in range(len(sizes) - 1):
            f = h @ params[f"omega{k}"].T + params[f"beta{k}"]
            h = activation(f) if k < len(sizes) - 2 else f
        return h

    largest = dict.fromkeys(params)
    losses = []
    for _ in range(steps):
        loss = ((network(x) - y) ** 2).mean()
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            for (name, p), grad in zip(params.items(), grads):
                if grad is not None:
                    largest[name] = max(largest[name] or 0.0, grad.abs().max().item())
                    p -= 0.02 * grad
    return losses[0], losses[-1], largest


# --- Problems 7.4 and 7.5: loss derivatives ---


def least_squares_derivative(f, y):
    """dl/df for l = (y - f)^2 (problem 7.4)."""
    return 2 * (f - y)


def binary_cross_entropy_derivative(f, y):
    """dl/df for l = -(1 - y) log[1 - sig f] - y log[sig f] (problem 7.5)."""
    return torch.sigmoid(f) - y


__all__ = [
    "PARAMS_7_1",
    "two_layer_net",
    "two_layer_derivatives",
    "toy_chain",
    "toy_chain_derivatives",
    "graph_7_12",
    "reverse_mode",
    "forward_mode",
    "least_squares_derivative",
    "binary_cross_entropy_derivative",
    "heaviside",
    "rect",
    "train_with_step_activation",
]
