"""Problem 7.11: gradient checkpointing in a 50-layer MLP.

With checkpoint_every=10 the forward keeps the activations only at every tenth layer; the
backward recomputes each stretch of ten layers from its checkpoint. It reports that the
gradients equal those of the plain model and the bytes autograd keeps either way.

    python -m handgrad.examples.checkpoint [--out DIR]
"""

import argparse

import torch

from handgrad.nn import MLP

from ._plotting import pyplot, save

DEPTH, WIDTH, BATCH = 50, 256, 512


def saved_bytes(model, x):
    """Bytes of distinct storage that autograd keeps for the backward of model(x)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), out


def compare(depth=DEPTH, width=WIDTH, batch=BATCH, every=10, seed=0):
    torch.manual_seed(seed)
    plain = MLP([width] * (depth + 1) + [1])
    checkpointed = MLP([width] * (depth + 1) + [1], checkpoint_every=every)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(batch, width)
    results = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        kept, out = saved_bytes(model, x)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        results[name] = (kept, grads)
    difference = max((a - b).abs().max().item()
                     for a, b in zip(results["plain"][1], results["checkpointed"][1]))
    return results["plain"][0], results["checkpointed"][0], difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args(argv)

    plain, checkpointed, difference = compare(every=args.every)
    print(f"{DEPTH}-layer MLP, width {WIDTH}, batch {BATCH}, checkpoint every {args.every} layers")
    print(f"bytes kept for backward: plain {plain:,}, checkpointed {checkpointed:,} "
          f"({checkpointed / plain:.1%})")
    print(f"largest gradient difference: {difference:.3e}")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(["plain", f"checkpoint every {args.every}"], [plain / 2**20, checkpointed / 2**20])
    ax.set(ylabel="MiB kept for backward", title="Gradient checkpointing (problem 7.11)")
    save(fig, args.out, "checkpoint.png")
    return plain, checkpointed, difference


if __name__ == "__main__":
    main()
