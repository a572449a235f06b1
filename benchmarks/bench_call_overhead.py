"""One small fused layer's cost per training step, where a model puts it: alone (the loss right
after it), and followed by a linear head, as in the actor-critic and the MNIST classifier of
tests/real_models.py (a 4 -> 128 layer at 1 row, a 784 -> 256 layer at 64 rows).

fuse() of those models measured slower than the models themselves (RESULTS.md), while
bench_layers.py, which times the layer alone, has the same layer at or below eager. This
script times both settings side by side, so that a change to the per-call path can be
judged in the setting that loses:

  - alone:     layer(x).sum(), backward
  - head:      linear(layer(x)).sum(), backward (the gradient reaches the layer from a product)
  - backward:  the layer's backward alone, on a graph kept (retain_graph), from a dense gradient

Every step asks for the gradients of the layer's weight and bias only, as a model's first
layer does. The candidates are timed round-robin in one run; each figure is the median.

    python benchmarks/bench_call_overhead.py [--rounds 7] [--threads 1]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import handgrad

SHAPES = {  # name: (rows, in, out, head outputs)
    "actor-critic layer": (1, 4, 128, 2),
    "MNIST classifier layer": (64, 784, 256, 10),
}
SETTINGS = ("alone", "head", "backward")
LAYERS = {
    "eager": lambda x, w, b: F.relu(F.linear(x, w, b)),
    "handgrad": handgrad.functional.linear_relu,
}


def steps(rows, d_in, d_out, head_outputs):
    """{(layer, setting): a step returning the weight's and bias's gradients}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=g)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).requires_grad_()
    b = torch.randn(d_out, generator=g).requires_grad_()
    w2 = (torch.randn(head_outputs, d_out, generator=g) / d_out**0.5).requires_grad_()
    b2 = torch.randn(head_outputs, generator=g).requires_grad_()
    grad = torch.randn(rows, d_out, generator=g)
    made = {}
    for name, layer in LAYERS.items():
        kept = layer(x, w, b)

        def alone(layer=layer):
            return torch.autograd.grad(layer(x, w, b).sum(), (w, b))

        def head(layer=layer):
            return torch.autograd.grad(F.linear(layer(x, w, b), w2, b2).sum(), (w, b))

        def backward(kept=kept):
            return torch.autograd.grad(kept, (w, b), grad, retain_graph=True)

        made.update({(name, "alone"): alone, (name, "head"): head, (name, "backward"): backward})
    return made


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per sample")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_layers import measure
    from machine import machine_description

    print(f"# One fused layer's cost per step, alone and followed by a head\n\n{machine_description('cpu')}\n")
    print("| layer (rows, in, out) | setting | eager µs | handgrad µs | handgrad − eager µs | handgrad/eager |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, shape in SHAPES.items():
        seconds = measure(steps(*shape), args.rounds, args.min_time)
        for setting in SETTINGS:
            eager, ours = seconds[("eager", setting)], seconds[("handgrad", setting)]
            rows.append({"layer": name, "setting": setting, "eager": eager, "handgrad": ours})
            print(f"| {name} {shape[:3]} | {setting} | {eager * 1e6:.1f} | {ours * 1e6:.1f} | "
                  f"{(ours - eager) * 1e6:+.1f} | **{ours / eager:.2f}** |", flush=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
