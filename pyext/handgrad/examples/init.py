"""Problems 7.14 and 7.15: what initialisation does to a deep ReLU network.

1. Monte Carlo check of problem 7.14: for a symmetric a with variance s^2,
   E[ReLU(a)^2] = s^2 / 2.
2. The variance of the activations through a 50-layer handgrad MLP under He
   (variance 2 / D_in, which makes up for the halving of 7.14), Xavier/Glorot
   (2 / (D_in + D_out)) and a too-small initialisation: He keeps it level, the others let
   it vanish geometrically.
3. Problem 7.15, all-zero initialisation, trained for 200 steps: at which step each
   parameter first receives gradient, and whether the units of a layer ever differ.

    python -m handgrad.examples.init [--out DIR]
"""

import argparse

import torch
from torch import nn

from handgrad.nn import MLP

from ._plotting import figure, progress

DEPTH, WIDTH, BATCH = 50, 100, 1000


def relu_second_moment(sigmas, samples, seed=0):
    """[(sigma, Monte Carlo E[ReLU(a)^2], sigma^2 / 2)] for a ~ N(0, sigma^2)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        a = sigma * torch.randn(samples, generator=g, dtype=torch.float64)
        rows.append((sigma, a.clamp(min=0).pow(2).mean().item(), sigma**2 / 2))
    return rows


INITIALISERS = {
    "He": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "Xavier (Glorot)": nn.init.xavier_normal_,
    "too small (std 0.01)": lambda w: nn.init.normal_(w, std=0.01),
}


def activation_variances(init, seed=0):
    """Variance of the pre-activations f_k = beta_k + Omega_k h_k at each layer k."""
    torch.manual_seed(seed)
    model = MLP([WIDTH] * (DEPTH + 1) + [1])
    variances = []
    with torch.no_grad():
        for layer in model.hidden:
            INITIALISERS[init](layer.weight)
            nn.init.zeros_(layer.bias)
        h = torch.randn(BATCH, WIDTH)
        for layer in model.hidden:
            variances.append((h @ layer.weight.T + layer.bias).var().item())
            h = layer(h)
    return variances


def zero_init_training(activation="relu", steps=200, seed=0):
    """Train an all-zero network (problem 7.15) with SGD: ({parameter name: first step at
    which it received gradient, or None}, {hidden layer: how far apart its units are, as
    the largest difference between two units' weights or biases over the largest of them},
    output bias gradient at the first step)."""
    torch.manual_seed(seed)
    model = MLP([10, 40, 40, 5], activation=activation)
    for parameter in model.parameters():
        nn.init.zeros_(parameter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(100, 10), torch.randn(100, 5)
    first = dict.fromkeys(name for name, _ in model.named_parameters())
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step == 1:
            output_bias_gradient = model.output.bias.grad.abs().max().item()
        for name, p in model.named_parameters():
            if first[name] is None and p.grad.abs().max() > 0:
                first[name] = step
        optimizer.step()
    # Unit j of a layer is row j of its weight and entry j of its bias. Identical units
    # stay identical but for rounding: ATen's column sums (the bias gradient, in eager too)
    # can round one column differently from the next.
    spread = {}
    with torch.no_grad():
        for k, layer in enumerate(model.hidden):
            units = torch.cat([layer.weight, layer.bias[:, None]], dim=1)
            spread[f"hidden.{k}"] = ((units - units[:1]).abs().max() / units.abs().max().clamp_min(1e-30)).item()
    return first, spread, output_bias_gradient


def layer_ratios(variances):
    """Variance of each layer over the one before it."""
    return [b / a for a, b in zip(variances, variances[1:])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--samples", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    print("Problem 7.14: E[ReLU(a)^2] for a ~ N(0, s^2)")
    print(f"{'s':>6}  {'Monte Carlo':>12}  {'s^2 / 2':>10}")
    moments = relu_second_moment([0.5, 1.0, 2.0, 3.0], args.samples)
    for sigma, estimate, exact in moments:
        print(f"{sigma:>6.2f}  {estimate:>12.5f}  {exact:>10.5f}")

    variances = {}
    for init in progress(INITIALISERS, len(INITIALISERS), "50-layer MLP"):
        variances[init] = activation_variances(init)
    print(f"\nVariance of the pre-activations of a {DEPTH}-layer ReLU MLP (width {WIDTH}):")
    print(f"{'layer':>5}  " + "  ".join(f"{name:>20}" for name in variances))
    for k in (0, 9, 19, 29, 39, 49):
        print(f"{k + 1:>5}  " + "  ".join(f"{v[k]:>20.3e}" for v in variances.values()))

    def draw(ax):
        for name, v in variances.items():
            ax.semilogy(range(1, DEPTH + 1), v, label=name)
        ax.set(xlabel="layer", ylabel="variance of pre-activations",
               title="Activations through a 50-layer handgrad MLP")
        ax.legend()

    figure(args.out, "init.png", draw)

    he, xavier = variances["He"], variances["Xavier (Glorot)"]
    xavier_ratio = torch.tensor(layer_ratios(xavier)).log().mean().exp().item()
    print(f"\nHe: {he[0]:.2f} at layer 1, {he[-1]:.2f} at layer {DEPTH} on this draw (its log "
          "drifts like a random walk; only its expectation stays level)")
    print(f"Xavier: each layer multiplies the variance by {xavier_ratio:.3f} on average "
          f"(width {WIDTH}: D Var[w] / 2 = {WIDTH} x {2 / (2 * WIDTH):.3f} / 2 = 0.5)")

    print(f"\nProblem 7.15: all weights and biases zero, {200} SGD steps:")
    zero_init = {}
    for activation in ("relu", "sigmoid"):
        first, spread, bias_gradient = zero_init_training(activation)
        zero_init[activation] = {"first_step": first, "unit_spread": spread,
                                 "output_bias_gradient": bias_gradient}
        print(f"  hidden {activation}: first step with gradient: "
              + ", ".join(f"{name} {step or 'never'}" for name, step in first.items()))
        print("    how far apart a layer's units are after 200 steps (relative): "
              + ", ".join(f"{name} {value:.1e}" for name, value in spread.items()))
    return {"moments": moments, "variances": variances, "xavier_ratio": xavier_ratio,
            "zero_init": zero_init}


if __name__ == "__main__":
    main()
