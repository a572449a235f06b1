"""Whole networks: handgrad.nn.MLP and fuse() against the same network in torch.nn, and
torch.compile of it, on the CPU.

For each network it times, round-robin in one run (bench_layers.measure, every timer on all
of torch's threads), from the same weights:
  - a training step: zero_grad, forward, MSE loss, loss.backward(), SGD with momentum;
  - forward+backward: forward, MSE loss and loss.backward(), what a network implementation
    controls (the optimizer step is the same for every candidate);
  - inference: the forward under torch.no_grad().
It also times a network that computes nothing: one autograd node (torch.cat) over one-element
parameters, as many as the network has, then the same loss and backward (and SGD step). That
node's time plus the network's FLOPs at the FMA limit is a bound no implementation beats
here; bound/torch.nn, beside each target of issue 27, says which targets can be met at all.
It then times the MLP's own op, mlp_forward + mlp_backward, to give the GFLOP/s of its
products against the machine's FMA limit, and counts the minor page faults of a training
step (fresh memory for stored activations), and times fuse() of the test suite's models of
real projects' code (tests/real_models.py: a VAE, an STN classifier, an actor-critic, NeRF,
torchvision's MLP with dropout, a GAN discriminator, an MNIST classifier, DeepSDF's decoder)
at the projects' sizes. Tables are markdown; the raw figures go to JSON.

    python benchmarks/bench_networks.py [--networks thin64-16k,...] [--rounds 7] [--out DIR]
"""

import argparse
import copy
import json
import os
import resource
import sys

import torch
import torch.nn.functional as F
from torch import nn

import handgrad.nn as hnn

NETWORKS = {  # name: (sizes, rows)
    "fig7.8 batch 10": ([10, 40, 40, 5], 10),  # the book's network and batch
    "fig7.8 batch 100": ([10, 40, 40, 5], 100),
    "MNIST-sized batch 64": ([784, 256, 256, 10], 64),
    "thin64 16k": ([64, 64, 64, 64, 64, 16], 16384),
    "thin64 64k": ([64, 64, 64, 64, 64, 16], 65536),
    "thin128 16k": ([64, 128, 128, 128, 128, 16], 16384),
    "wide512 batch 256": ([512, 512, 512, 512, 10], 256),
    "wide1024 batch 4096": ([1024, 1024, 1024, 10], 4096),
}
# The networks run by default; the wide ones are for --activation silu and the like, where
# the network is recorded as a chain of layers (README, "Networks whose a' is read off f").
DEFAULT_NETWORKS = [name for name in NETWORKS if not name.startswith("wide")]
TORCH_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                     "silu": nn.SiLU, "gelu": nn.GELU, "softplus": nn.Softplus}
CANDIDATES = ["torch.nn", "handgrad MLP", "fuse(Sequential)", "compile(torch.nn)"]
# Issue 27's targets for the MLP, MLP/torch.nn: {(network, mode): target}.
TARGETS = {
    ("fig7.8 batch 10", "fwd+bwd"): 0.55, ("fig7.8 batch 100", "fwd+bwd"): 0.55,
    ("MNIST-sized batch 64", "fwd+bwd"): 0.65, ("MNIST-sized batch 64", "step"): 0.75,
    **{(name, mode): 0.40 for name in ("thin64 16k", "thin64 64k", "thin128 16k")
       for mode in ("fwd+bwd", "inference")},
}


def real_model_cases():
    """{name: (model, input)}: the test suite's models of real projects' code
    (tests/real_models.py), at the projects' own sizes and batches."""
    from real_models import (ActorCritic, DeepSDFDecoder, GANDiscriminator, MNISTClassifier, NeRF,
                             STNClassifier, TorchvisionMLP, VAE)

    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    return {
        "VAE (pytorch/examples), batch 128": (VAE(784, 400, 20), torch.rand(128, 784, generator=g)),
        "STN classifier (tutorial), batch 64": (STNClassifier(), torch.randn(64, 1, 28, 28, generator=g)),
        "actor-critic (pytorch/examples), 1 state": (ActorCritic(), torch.randn(1, 4, generator=g)),
        "NeRF-sized, 4096 rows": (NeRF(256, 8, (4,), 63), torch.randn(4096, 63, generator=g)),
        "torchvision MLP, dropout 0.1, batch 256": (TorchvisionMLP(512, [512, 512, 10], dropout=0.1),
                                                    torch.randn(256, 512, generator=g)),
        "GAN discriminator (PyTorch-GAN), batch 64": (GANDiscriminator(),
                                                      torch.randn(64, 1, 28, 28, generator=g)),
        "MNIST classifier, batch 64": (MNISTClassifier(), torch.randn(64, 784, generator=g)),
        "DeepSDF decoder 512x4, 2048 points": (
            DeepSDFDecoder(torch.nn.utils.parametrizations.weight_norm, 512, 4, 259),
            torch.randn(2048, 259, generator=g)),
    }


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


# Issue 27's targets for fuse() of real model code, fused/unfused; every other model's is 1.00.
REAL_TARGETS = {"NeRF-sized, 4096 rows": 0.60}


def model_flops(step):
    """The FLOPs of one call of step as eager runs it (torch.utils.flop_counter: the matrix
    products and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def real_models(rounds, min_time, measure, names=None):
    """fuse() of models written as projects write them, against the same model unfused:
    forward, a loss and loss.backward(), in training mode (dropout on); and the FLOPs of the
    unfused model's step, whose time at the FMA limit no implementation beats."""
    rows = []
    for name, (model, x) in real_model_cases().items():
        if names is not None and name not in names:
            continue
        # Traced now, for the example input (DeepSDF branches on its shape), not at the first call.
        fused = hnn.fuse(copy.deepcopy(model), example_inputs=(x,))
        fused_layers = sum(d.fused for d in hnn.fusion_decisions(model, (x,)))

        def step(net):
            def run():
                net.zero_grad(set_to_none=True)
                first_output(net(x)).square().mean().backward()
            return run

        seconds = measure({"unfused": step(model), "fused": step(fused)}, rounds, min_time)
        rows.append({"model": name, "fused layers": fused_layers, "flops": model_flops(step(model)),
                     **seconds})
    return rows


MODES = ["step", "fwd+bwd", "inference"]


def models(sizes, seed=0, compile=False, activation="relu"):
    """The same network three ways (four with torch.compile of the torch.nn one), with
    identical weights, and torch.nn's defaults for the activation's parameters."""
    torch.manual_seed(seed)
    mlp = hnn.MLP(sizes, activation=activation)
    layers = []
    for layer in [*mlp.hidden, mlp.output]:
        linear = nn.Linear(layer.in_features, layer.out_features)
        linear.load_state_dict(layer.state_dict())
        layers += [linear, TORCH_ACTIVATIONS[activation]()]
    reference = nn.Sequential(*layers[:-1])  # no activation after the output layer
    fused = hnn.fuse(copy.deepcopy(reference))
    candidates = {"torch.nn": reference, "handgrad MLP": mlp, "fuse(Sequential)": fused}
    if compile:  # what a user would reach for instead
        torch._dynamo.reset()
        candidates["compile(torch.nn)"] = torch.compile(copy.deepcopy(reference), dynamic=False)
    return candidates


def training_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def step():
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    return step


def forward_backward(model, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()

    return step


def inference(model, x):
    def step():
        with torch.no_grad():
            model(x)

    return step


def op_gflops(mlp, x, y, rounds, min_time, measure, activation="relu"):
    """The MLP op's own forward (storing activations) and backward, and the GFLOP/s of the
    products they make: 2 rows d_in d_out per layer forward, twice that backward (dl/dOmega
    and dl/dh; none for dl/dx of the input)."""
    layers = [*mlp.hidden, mlp.output]
    weights = [layer.weight.detach() for layer in layers]
    biases = [layer.bias.detach() for layer in layers]
    ops = torch.ops.handgrad
    grad_output = torch.randn(x.shape[0], weights[-1].shape[0])

    def forward():
        return ops.mlp_forward(x, weights, biases, activation, 0.01, 0)

    _, saved = forward()

    def backward():
        ops.mlp_backward(grad_output, x, weights, biases, saved, activation, 0.01, 0, False)

    seconds = measure({"forward": forward, "backward": backward}, rounds, min_time)
    rows = x.shape[0]
    products = [2 * rows * w.shape[0] * w.shape[1] for w in weights]
    flops = {"forward": sum(products), "backward": 2 * sum(products) - products[0]}
    return {mode: flops[mode] / seconds[mode] / 1e9 for mode in flops} | {
        f"{mode} s": seconds[mode] for mode in flops}


def node_steps(reference, x, y):
    """The steps of a network that computes nothing: one node over one-element parameters,
    as many as reference has, with the same loss, backward and optimizer; and those
    parameters."""
    parameters = [torch.zeros(1, requires_grad=True) for _ in reference.parameters()]
    target = y.new_zeros(y.shape[0], len(parameters))
    optimizer = torch.optim.SGD(parameters, lr=1e-6, momentum=0.9)

    def output():
        return torch.cat(parameters).expand(y.shape[0], -1)

    def forward_backward():
        for p in parameters:
            p.grad = None
        F.mse_loss(output(), target).backward()

    def step():
        optimizer.zero_grad()
        F.mse_loss(output(), target).backward()
        optimizer.step()

    def inference():
        with torch.no_grad():
            output()

    return {"node step": step, "node fwd+bwd": forward_backward, "node inference": inference}, parameters


def flops(sizes, rows, mode):
    """The products' FLOPs: 2 rows d_in d_out per layer forward; backward twice that, less
    dl/dx of the input, which torch.nn's x does not ask for."""
    products = [2 * rows * d_in * d_out for d_in, d_out in zip(sizes, sizes[1:])]
    return sum(products) if mode == "inference" else 3 * sum(products) - products[0]


def bound(row, mode, limit):
    """Seconds no implementation beats: the node network's, plus the FLOPs at the FMA limit."""
    return row[f"node {mode}"] + (flops(row["sizes"], row["rows"], mode) / (limit * 1e9) if limit else 0.0)


def page_faults(step, calls=5):
    """Minor page faults per call of step (the kernel's count for this process)."""
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def ratio_table(rows, mode, candidates):
    others = candidates[1:]
    print("| network | sizes | rows | torch.nn ms | " + " | ".join(f"{c} ms" for c in others) + " | "
          + " | ".join(f"{c}/torch.nn" for c in others) + " |")
    print("|---" * (4 + 2 * len(others)) + "|")
    for r in rows:
        base = r[f"torch.nn {mode}"]
        times = [r[f"{c} {mode}"] for c in others]
        print(f"| {r['network']} | {'-'.join(map(str, r['sizes']))} | {r['rows']} | {base * 1e3:.3f} | "
              + " | ".join(f"{t * 1e3:.3f}" for t in times) + " | "
              + " | ".join(f"**{t / base:.2f}**" for t in times) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                        help="comma-separated, of: " + ", ".join(NETWORKS) + " (default: all but the wide ones)")
    parser.add_argument("--activation", default="relu", choices=list(TORCH_ACTIVATIONS),
                        help="the hidden layers' activation, torch.nn's defaults for its parameters "
                             "(issue 27's targets are ReLU's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per sample")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--real-models", choices=["yes", "no"], default="yes",
                        help="also time fuse() of the test suite's models of real projects' code")
    parser.add_argument("--compile", choices=["yes", "no"], default="yes",
                        help="time torch.compile of the torch.nn network too (compiling takes a while)")
    args = parser.parse_args(argv)
    names = args.networks.split(",")
    for name in names:
        if name not in NETWORKS:
            parser.error(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")

    from bench_layers import measure
    from machine import blas_gflops, fma_limit, machine_description

    machine = machine_description("cpu")
    print(f"# Whole networks, {args.activation}\n\n{machine}\n", flush=True)
    rows = []
    for name in names:
        sizes, batch = NETWORKS[name]
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(batch, sizes[0], generator=g), torch.randn(batch, sizes[-1], generator=g)
        candidates = models(sizes, compile=args.compile == "yes", activation=args.activation)
        steps = {}
        for c, model in candidates.items():
            steps[f"{c} step"] = training_step(model, x, y)
            steps[f"{c} fwd+bwd"] = forward_backward(model, x, y)
            steps[f"{c} inference"] = inference(model, x)
        steps.update(node_steps(candidates["torch.nn"], x, y)[0])
        row = {"network": name, "sizes": sizes, "rows": batch, **measure(steps, args.rounds, args.min_time)}
        row["op"] = op_gflops(candidates["handgrad MLP"], x, y, args.rounds, args.min_time, measure, args.activation)
        row["page faults"] = {c: page_faults(steps[f"{c} step"]) for c in candidates}
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{c} {row[f'{c} fwd+bwd'] * 1e3:.3f} ms" for c in candidates),
              file=sys.stderr, flush=True)

    for mode, title in (("fwd+bwd", "Forward, MSE loss and `loss.backward()`"),
                        ("inference", "Inference: the forward under `torch.no_grad()`"),
                        ("step", "A training step: zero_grad, forward, MSE, backward, SGD step")):
        print(f"\n{title}; medians, and ratios of medians from the same run.\n")
        ratio_table(rows, mode, list(candidates))
    limit = fma_limit(torch.get_num_threads())
    print("\nWhat bounds the MLP: the network that computes nothing (one node, the same loss and "
          "backward), plus the FLOPs at the FMA limit; a target below bound/torch.nn cannot be met "
          "by any implementation on this machine. At BLAS's rate: the node network plus the FLOPs "
          "at sgemm's 1024^3 GFLOP/s, what the best-shaped product reaches here.\n")
    print("| network | mode | torch.nn ms | node ms | bound ms | MLP/torch.nn | bound/torch.nn "
          "| at BLAS's rate/torch.nn | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode in MODES:
            base, b = r[f"torch.nn {mode}"], bound(r, mode, limit)
            target = TARGETS.get((r["network"], mode)) if args.activation == "relu" else None
            print(f"| {r['network']} | {mode} | {base * 1e3:.3f} | {r[f'node {mode}'] * 1e3:.3f} "
                  f"| {b * 1e3:.3f} | **{r[f'handgrad MLP {mode}'] / base:.2f}** | {b / base:.2f} "
                  f"| {bound(r, mode, blas_gflops()) / base:.2f} | {'-' if target is None else f'{target:.2f}'} |")
    print(f"\nInside the MLP op: the GFLOP/s of its products (mlp_forward, storing activations; "
          f"mlp_backward), against the FMA limit ({limit:.0f} GFLOP/s on {torch.get_num_threads()} "
          f"threads), and minor page faults per training step.\n" if limit else
          "\nInside the MLP op: the GFLOP/s of its products, and minor page faults per training step.\n")
    print("| network | forward GFLOP/s | backward GFLOP/s | forward % of limit | backward % of limit "
          "| page faults torch.nn | page faults MLP |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        op, faults = r["op"], r["page faults"]
        share = (lambda v: f"{100 * v / limit:.0f} %") if limit else (lambda v: "-")
        print(f"| {r['network']} | {op['forward']:.1f} | {op['backward']:.1f} | {share(op['forward'])} "
              f"| {share(op['backward'])} | {faults['torch.nn']:.0f} | {faults['handgrad MLP']:.0f} |")
    real = real_models(args.rounds, args.min_time, measure) if args.real_models == "yes" else []
    if real:
        print("\nfuse() of real model code (forward, loss, loss.backward(), training mode), against "
              "the same model unfused. Bound: the unfused step's FLOPs (its products and "
              "convolutions, forward and backward) at the FMA limit; a target below bound/unfused "
              "cannot be met by any implementation on this machine. At BLAS's rate: the same FLOPs "
              "at sgemm's 1024^3 GFLOP/s, what the best-shaped product reaches here.\n")
        print("| model | layers fused | unfused ms | fused ms | GFLOP | fused/unfused | bound/unfused "
              "| at BLAS's rate/unfused | target |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in real:
            flops_bound = f"{r['flops'] / (limit * 1e9) / r['unfused']:.2f}" if limit else "-"
            print(f"| {r['model']} | {r['fused layers']} | {r['unfused'] * 1e3:.3f} | {r['fused'] * 1e3:.3f} | "
                  f"{r['flops'] / 1e9:.3g} | **{r['fused'] / r['unfused']:.2f}** | {flops_bound} | "
                  f"{r['flops'] / (blas_gflops() * 1e9) / r['unfused']:.2f} | "
                  f"{REAL_TARGETS.get(r['model'], 1.0):.2f} |")
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.activation == "relu" else f"_{args.activation}"
    with open(os.path.join(args.out, f"bench_networks{suffix}.json"), "w") as f:
        json.dump({"machine": machine, "activation": args.activation, "results": rows, "real models": real},
                  f, indent=1)
    return rows


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.join(os.path.dirname(here), "tests")]  # real_models.py
    main()
