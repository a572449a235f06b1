"""Second-order training steps: the loss holds a derivative of the network with respect to
its input, so each step runs a double backward (a triple one for a PINN's u_xx).

For each workload it builds the network three ways from the same weights, torch.nn
(Linear + activation in a Sequential), handgrad.nn.MLP and fuse() of the torch.nn one, and
times the whole step, round-robin in one run (bench_layers.measure, on all of torch's
threads): forward, torch.autograd.grad(..., create_graph=True), the loss, loss.backward().
Before timing, it checks that every candidate's parameter gradients agree with torch.nn's
in float64. Tables are markdown; the raw figures go to JSON.

  - WGAN-GP: PyTorch-GAN's discriminator 784-512-256-1, LeakyReLU(0.2), batch 64, the
    gradient penalty at interpolates (lambda 10) plus the critic's loss;
  - eikonal: a neural SDF 3-256x4-1 (IGR/DeepSDF-sized), |f| on 8,192 surface points plus
    (|grad f| - 1)^2 on 2,048 others;
  - Burgers PINN: Raissi's 2-(20)x8-1 tanh on 4,096 collocation points: u_t + u u_x -
    (0.01/pi) u_xx, which needs u_xx, a third order in the step's backward;
  - DeepXDE's 2-20-20-20-1 tanh, the same residual;
  - an eikonal loss on a smooth network, 3-128x4-1 SiLU (second order only);
  - IGR's and NeuS's SDF activation, softplus(beta=100), on the 3-256x4-1 eikonal network;
  - WGAN-GP's loss on a wide SiLU critic, 784-512x3-1 at batch 256, which handgrad.nn.MLP
    records as a chain of layers (README, "Networks whose a' is read off f").

    python benchmarks/bench_second_order.py [--workloads wgan-gp,...] [--rounds 7] [--out DIR]
"""

import argparse
import copy
import json
import math
import os
import sys

import torch
from torch import nn

import handgrad.nn as hnn

WORKLOADS = {  # name: (sizes, activation, its parameters, loss, rows)
    "WGAN-GP 784-512-256-1 leaky_relu(0.2), batch 64": ([784, 512, 256, 1], "leaky_relu", {"negative_slope": 0.2},
                                                        "wgan-gp", 64),
    "eikonal 3-256x4-1 relu, 8192+2048 points": ([3, 256, 256, 256, 256, 1], "relu", {}, "eikonal", 10240),
    "Burgers PINN 2-(20)x8-1 tanh, 4096 points": ([2] + [20] * 8 + [1], "tanh", {}, "burgers", 4096),
    "DeepXDE 2-20-20-20-1 tanh, 4096 points": ([2, 20, 20, 20, 1], "tanh", {}, "burgers", 4096),
    "eikonal 3-128x4-1 silu, 8192+2048 points": ([3, 128, 128, 128, 128, 1], "silu", {}, "eikonal", 10240),
    "eikonal 3-256x4-1 softplus(beta=100), 8192+2048 points": ([3, 256, 256, 256, 256, 1], "softplus",
                                                               {"beta": 100.0}, "eikonal", 10240),
    "gradient penalty 784-512x3-1 silu, batch 256": ([784, 512, 512, 512, 1], "silu", {}, "wgan-gp", 256),
}
SHORT = {"wgan-gp": 0, "eikonal": 1, "burgers": 2, "deepxde": 3, "eikonal-silu": 4, "eikonal-softplus": 5,
         "penalty-silu": 6}
CANDIDATES = ["torch.nn", "handgrad MLP", "fuse(torch.nn)"]
TORCH_ACTIVATIONS = {"relu": lambda p: nn.ReLU(), "leaky_relu": lambda p: nn.LeakyReLU(**p),
                     "sigmoid": lambda p: nn.Sigmoid(), "tanh": lambda p: nn.Tanh(), "silu": lambda p: nn.SiLU(),
                     "softplus": lambda p: nn.Softplus(**p)}


def models(sizes, activation, parameters, dtype=torch.float32, seed=0):
    """{candidate: model}, with identical weights."""
    torch.manual_seed(seed)
    mlp = hnn.MLP(sizes, activation=activation, dtype=dtype, **parameters)
    layers = []
    for layer in [*mlp.hidden, mlp.output]:
        linear = nn.Linear(layer.in_features, layer.out_features, dtype=dtype)
        linear.load_state_dict(layer.state_dict())
        layers += [linear, TORCH_ACTIVATIONS[activation](parameters)]
    reference = nn.Sequential(*layers[:-1])
    return {"torch.nn": reference, "handgrad MLP": mlp, "fuse(torch.nn)": hnn.fuse(copy.deepcopy(reference))}


def grad_of(out, x):
    return torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)[0]


def make_loss(kind, rows, d_in, dtype, seed=1):
    """loss(model) -> scalar, on inputs drawn once."""
    g = torch.Generator().manual_seed(seed)
    if kind == "wgan-gp":
        real, fake = torch.randn(rows, d_in, generator=g, dtype=dtype), torch.randn(rows, d_in, generator=g, dtype=dtype)
        alpha = torch.rand(rows, 1, generator=g, dtype=dtype)

        def loss(model):
            interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_()
            gradients = grad_of(model(interpolates), interpolates)
            penalty = ((gradients.norm(2, dim=1) - 1) ** 2).mean()
            return model(fake).mean() - model(real).mean() + 10 * penalty
        return loss
    if kind == "eikonal":
        surface = torch.randn(8192, d_in, generator=g, dtype=dtype)
        others = torch.randn(rows - 8192, d_in, generator=g, dtype=dtype)

        def loss(model):
            points = torch.cat([surface, others]).requires_grad_()
            sdf = model(points)
            gradients = grad_of(sdf, points)[8192:]
            return sdf[:8192].abs().mean() + 0.1 * ((gradients.norm(2, dim=1) - 1) ** 2).mean()
        return loss
    # Burgers: u_t + u u_x - (0.01/pi) u_xx = 0 at collocation points (x, t), plus u's initial values.
    points = torch.rand(rows, 2, generator=g, dtype=dtype) * torch.tensor([2.0, 1.0], dtype=dtype) - \
        torch.tensor([1.0, 0.0], dtype=dtype)
    initial = torch.stack([torch.linspace(-1, 1, 256, dtype=dtype), torch.zeros(256, dtype=dtype)], 1)
    u0 = -torch.sin(math.pi * initial[:, :1])

    def loss(model):
        xt = points.clone().requires_grad_()
        u = model(xt)
        du = grad_of(u, xt)
        u_x, u_t = du[:, :1], du[:, 1:]
        u_xx = grad_of(u_x, xt)[:, :1]
        residual = u_t + u * u_x - (0.01 / math.pi) * u_xx
        return (residual ** 2).mean() + ((model(initial) - u0) ** 2).mean()
    return loss


def step(model, loss):
    def run():
        model.zero_grad(set_to_none=True)
        loss(model).backward()
    return run


def agreement(sizes, activation, parameters, kind, rows):
    """The largest relative difference of a parameter gradient from torch.nn's, in float64."""
    candidates = models(sizes, activation, parameters, dtype=torch.float64)
    loss = make_loss(kind, rows, sizes[0], torch.float64)
    grads = {}
    for name, model in candidates.items():
        loss(model).backward()
        grads[name] = [p.grad for p in model.parameters()]
    worst = 0.0
    for name in CANDIDATES[1:]:
        for a, b in zip(grads[name], grads["torch.nn"]):
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item())
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(SHORT),
                        help="comma-separated, of: " + ", ".join(SHORT))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per sample")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    chosen = []
    for short in args.workloads.split(","):
        if short not in SHORT:
            parser.error(f"unknown workload {short!r}; choose from {', '.join(SHORT)}")
        chosen.append(list(WORKLOADS)[SHORT[short]])

    from bench_layers import measure
    from machine import machine_description

    machine = machine_description("cpu")
    print(f"# Second-order training steps\n\n{machine}\n", flush=True)
    rows = []
    for name in chosen:
        sizes, activation, parameters, kind, batch = WORKLOADS[name]
        worst = agreement(sizes, activation, parameters, kind, batch)
        loss = make_loss(kind, batch, sizes[0], torch.float32)
        steps = {c: step(m, loss) for c, m in models(sizes, activation, parameters).items()}
        row = {"workload": name, "float64 agreement": worst, **measure(steps, args.rounds, args.min_time)}
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{c} {row[c] * 1e3:.2f} ms" for c in CANDIDATES), file=sys.stderr,
              flush=True)

    print("Whole step (forward, the input gradient with create_graph=True, the loss, `loss.backward()`), "
          "median ms; ratio to torch.nn (lower is faster); the largest relative difference of a "
          "parameter gradient from torch.nn's in float64.\n")
    print("| workload | torch.nn ms | handgrad MLP | fuse(torch.nn) | float64 difference |")
    print("|---|---|---|---|---|")
    for row in rows:
        base = row["torch.nn"]
        print(f"| {row['workload']} | {base * 1e3:.2f} | {row['handgrad MLP'] / base:.2f}x | "
              f"{row['fuse(torch.nn)'] / base:.2f}x | {row['float64 agreement']:.1e} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "second_order.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
