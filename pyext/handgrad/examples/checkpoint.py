"""Problem 7.11: gradient checkpointing in a 50-layer MLP, measured.

With checkpoint_every=k the forward stores the output of every k-th hidden layer only; the
backward recomputes one stretch of k layers at a time from its stored input, then
backpropagates through it. For no checkpointing, k = 5 and k = 10 this measures, with
PyTorch's profiler (every allocation and free, inside the ops too):

  - stored: the memory the forward leaves allocated for the backward;
  - peak in backward: the most memory in use at one time during the backward, the stored
    activations included: the recomputed stretch and the gradients need room too;
  - the time of a forward+backward, whose extra over no checkpointing is the recomputation;

and checks that the gradients equal those of the plain network.

    python -m handgrad.examples.checkpoint [--out DIR]
"""

import argparse
import statistics
import time


import torch

from handgrad.nn import MLP

from ._plotting import figure

DEPTH, WIDTH, BATCH = 50, 256, 512
CHOICES = (None, 5, 10)


def allocation_profile(step):
    """(net, peak): bytes still allocated after step() and the most allocated at one time
    during it, counted from zero at its start, from the profiler's memory events."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        result = step()
    events = sorted((event.start_ns(), event.nbytes())
                    for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return current, peak, result


def measure(model, x):
    """stored, peak in backward (both in bytes) and the gradients of one step."""
    parameters = list(model.parameters())
    stored, _, out = allocation_profile(lambda: model(x))
    loss = out.square().mean()
    _, backward_peak, grads = allocation_profile(lambda: torch.autograd.grad(loss, parameters))
    del loss, out
    return stored, stored + backward_peak, grads


def step_seconds(model, x, repeats=5):
    def step():
        torch.autograd.grad(model(x).square().mean(), list(model.parameters()))

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(depth=DEPTH, width=WIDTH, batch=BATCH, choices=CHOICES, seed=0, repeats=5):
    """{k: (stored bytes, peak bytes in backward, seconds per step)} and the largest gradient
    difference from the network without checkpointing."""
    torch.manual_seed(seed)
    sizes = [width] * (depth + 1) + [1]
    plain = MLP(sizes)
    x = torch.randn(batch, width)
    results, grads = {}, {}
    for every in choices:
        model = MLP(sizes, checkpoint_every=every)
        model.load_state_dict(plain.state_dict())
        stored, peak, grads[every] = measure(model, x)
        results[every] = (stored, peak, step_seconds(model, x, repeats))
    difference = max((a - b).abs().max().item() for every in choices
                     for a, b in zip(grads[every], grads[choices[0]]))
    return results, difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--depth", type=int, default=DEPTH)
    args = parser.parse_args(argv)

    results, difference = compare(depth=args.depth)
    base_stored, base_peak, base_time = results[None]
    print(f"{args.depth}-layer MLP, width {WIDTH}, batch {BATCH}; one layer's output is "
          f"{BATCH * WIDTH * 4 / 2**20:.2f} MiB\n")
    print("| checkpoint_every | stored MiB | peak in backward MiB | peak / none | step ms | step / none |")
    print("|---|---|---|---|---|---|")
    for every, (stored, peak, seconds) in results.items():
        print(f"| {every or 'none'} | {stored / 2**20:.1f} | {peak / 2**20:.1f} | "
              f"{peak / base_peak:.0%} | {seconds * 1e3:.1f} | {seconds / base_time:.2f} |")
    print(f"\nlargest gradient difference from no checkpointing: {difference:.3e}")

    def draw(ax):
        labels = [f"every {every}" if every else "none" for every in results]
        positions = range(len(labels))
        ax.bar([p - 0.2 for p in positions], [r[0] / 2**20 for r in results.values()], width=0.4,
               label="stored by the forward")
        ax.bar([p + 0.2 for p in positions], [r[1] / 2**20 for r in results.values()], width=0.4,
               label="peak during the backward")
        ax.set_xticks(list(positions))
        ax.set_xticklabels(labels)
        ax.set(ylabel="MiB", title="Gradient checkpointing (problem 7.11)")
        ax.legend()

    figure(args.out, "checkpoint.png", draw)
    return results, difference


if __name__ == "__main__":
    main()
