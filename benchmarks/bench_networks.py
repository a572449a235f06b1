"""Whole training steps: handgrad.nn.MLP and fuse() against the same network in torch.nn.

One step is what a training loop does: zero_grad, forward, MSE loss, backward, and an SGD
step with momentum. The three candidates start from the same weights and are timed
round-robin in one run (each sample at least --min-time seconds), so that drifts of the
machine touch all alike; the table gives medians and their ratios to torch.nn.

    python benchmarks/bench_networks.py [--rounds 9] [--min-time 0.2] [--out DIR]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import handgrad.nn as hnn

NETWORKS = {  # name: (sizes, batch)
    "fig7.8 batch 10": ([10, 40, 40, 5], 10),  # the book's network and batch
    "fig7.8 batch 100": ([10, 40, 40, 5], 100),
    "MNIST-sized batch 64": ([784, 256, 256, 10], 64),
}
CANDIDATES = ["torch.nn", "handgrad MLP", "fuse(Sequential)"]


def models(sizes, seed=0):
    """The same network three ways, with identical weights."""
    torch.manual_seed(seed)
    mlp = hnn.MLP(sizes, activation="relu")
    layers = []
    for layer in [*mlp.hidden, mlp.output]:
        linear = nn.Linear(layer.in_features, layer.out_features)
        linear.load_state_dict(layer.state_dict())
        layers += [linear, nn.ReLU()]
    reference = nn.Sequential(*layers[:-1])  # no activation after the output layer
    fused = hnn.fuse(copy.deepcopy(reference))
    return {"torch.nn": reference, "handgrad MLP": mlp, "fuse(Sequential)": fused}


def training_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    return step


def forward_backward(model, x, y):
    """The part a network implementation controls: forward, loss and backward, with the
    gradients returned rather than accumulated (no zero_grad, no optimizer)."""
    parameters = list(model.parameters())
    return lambda: torch.autograd.grad(F.mse_loss(model(x), y), parameters)


def optimizer_only(model):
    """The SGD step alone, on gradients of the right shapes (set once): the same for every
    candidate, and part of every training step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return optimizer.step


def measure(steps, rounds, min_time):
    numbers = {}
    for name, step in steps.items():  # warm up; calls per sample
        step()
        start = time.perf_counter()
        step()
        numbers[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                step()
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(rows, suffix, header, leading):
    """One markdown row per network: leading(row), then the three candidates' times (their
    keys end in suffix) and their ratios to torch.nn."""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        base, mlp, fused = (r[c + suffix] for c in CANDIDATES)
        print(f"| {r['network']} | {leading(r)} | {base * 1e6:.1f} | {mlp * 1e6:.1f} | {fused * 1e6:.1f} "
              f"| **{mlp / base:.2f}** | **{fused / base:.2f}** |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help="comma-separated, of: " + ", ".join(NETWORKS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per sample")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    names = args.networks.split(",")
    for name in names:
        if name not in NETWORKS:
            parser.error(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")

    from bench_layers import machine_description

    print(f"# Training steps\n\n{machine_description('cpu')}\n", flush=True)
    rows = []
    for name in names:
        sizes, batch = NETWORKS[name]
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(batch, sizes[0], generator=g), torch.randn(batch, sizes[-1], generator=g)
        candidates = models(sizes)
        steps = {c: training_step(model, x, y) for c, model in candidates.items()}
        steps.update({f"{c} fwd+bwd": forward_backward(model, x, y) for c, model in candidates.items()})
        steps["optimizer"] = optimizer_only(candidates["torch.nn"])
        medians = measure(steps, args.rounds, args.min_time)
        rows.append({"network": name, "sizes": sizes, "batch": batch, **medians})
        print(f"  {name}: " + ", ".join(f"{c} {medians[c] * 1e6:.1f} us" for c in CANDIDATES),
              file=sys.stderr, flush=True)

    print("Median time of one SGD step (zero_grad, forward, MSE, backward, step); ratios of "
          "medians from the same run.\n")
    print_table(rows, "", "| network | sizes | batch | torch.nn us | MLP us | fuse us | MLP/torch.nn "
                "| fuse/torch.nn |", lambda r: f"{'-'.join(map(str, r['sizes']))} | {r['batch']}")
    print("\nWhere the time goes (the same run): forward, MSE and backward alone, which is what "
          "a network implementation controls, and the SGD step alone, which every candidate "
          "pays alike.\n")
    print_table(rows, " fwd+bwd", "| network | SGD step us | torch.nn fwd+bwd us | MLP fwd+bwd us "
                "| fuse fwd+bwd us | MLP/torch.nn | fuse/torch.nn |",
                lambda r: f"{r['optimizer'] * 1e6:.1f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_networks.json"), "w") as f:
        json.dump({"machine": machine_description("cpu"), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
