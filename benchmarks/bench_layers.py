"""Speed and memory of the handgrad layers against PyTorch, on the CPU.

For each activation and shape (N rows, K in_features, M out_features) it times, interleaved
in one run with torch.utils.benchmark:
  - forward+backward and forward alone;
  - handgrad, nn.Linear + activation in eager mode, and torch.compile of the same;
  - the floor: the bare matrix products any implementation must do (one for the forward,
    three for forward+backward);
  - the node: an autograd node over three one-element tensors that computes nothing
    (torch.cat of their views): the fixed cost any one-node layer pays, whatever its size.
The bound is what no implementation can beat on this machine: the node's time plus the
products' FLOPs at the FMA limit (benchmarks/machine.py); bound/eager is the best ratio to
eager there is, to set beside each target.
It prints a markdown table of medians and ratios, writes it with the raw figures to JSON,
and draws the handgrad/eager ratios as a bar chart (PNG). It also counts the bytes autograd
keeps for an 8-layer MLP, through torch.autograd.graph.saved_tensors_hooks.

    python benchmarks/bench_layers.py [--shapes tiny,thin] [--activations relu] [--out DIR]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import nn

import handgrad.functional as hf
import handgrad.nn as hnn
from handgrad.memory import saved_bytes
from machine import fma_limit, machine_description

SHAPES = {  # name: (N, K, M)
    "tiny": (10, 10, 40),  # figure 7.8 size: overhead-bound
    "mid": (256, 512, 512),
    "large": (4096, 1024, 1024),
    "skinny": (16384, 256, 256),
    "thin": (65536, 64, 64),
}
GPU_SHAPES = {
    "8k": (8192, 1024, 1024),
    "16k-4k": (16384, 4096, 4096),
    "64k-256": (65536, 256, 256),
    "256k-64": (262144, 64, 64),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ACTIVATIONS = {  # name: (handgrad fused, eager activation, handgrad module, torch.nn module)
    "relu": (hf.linear_relu, F.relu, hnn.LinearReLU, nn.ReLU),
    "leaky_relu": (
        lambda x, w, b: hf.linear_leaky_relu(x, w, b, 0.1),
        lambda f: F.leaky_relu(f, 0.1),
        lambda i, o: hnn.LinearLeakyReLU(i, o, negative_slope=0.1),
        lambda: nn.LeakyReLU(0.1),
    ),
    "sigmoid": (hf.linear_sigmoid, torch.sigmoid, hnn.LinearSigmoid, nn.Sigmoid),
    "tanh": (hf.linear_tanh, torch.tanh, hnn.LinearTanh, nn.Tanh),
    "silu": (hf.linear_silu, F.silu, hnn.LinearSiLU, nn.SiLU),
    "gelu": (hf.linear_gelu, F.gelu, hnn.LinearGELU, nn.GELU),
    "softplus": (hf.linear_softplus, F.softplus, hnn.LinearSoftplus, nn.Softplus),
}
# The chapter's three, which the tables of RESULTS.md were made with; the others by --activations.
DEFAULT_ACTIVATIONS = ["relu", "leaky_relu", "sigmoid"]

CANDIDATES = ["handgrad", "eager", "compile", "floor", "node"]
# Per shape, the fwd+bwd target of issue 27 (handgrad/eager on the CPU; every shape <= 1.00).
TARGETS = {"tiny": 0.70, "skinny": 0.90, "thin": 0.60}


def replay_from_cuda_graph(step):
    """step captured in a CUDA graph; returns graph.replay (GPU-bound time, one launch)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up the caching allocator outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def make_steps(activation, shape, device="cpu", dtype=torch.float32, seed=0, candidates=CANDIDATES):
    """The callables to time: {(mode, candidate): fn} for mode in fwd+bwd and fwd, and on a
    GPU also "fwd+bwd graph" and "fwd graph" (replayed from a CUDA graph: the GPU's time,
    without launch overhead)."""
    fused, eager_activation, _, _ = ACTIVATIONS[activation]
    N, K, M = shape
    g = torch.Generator().manual_seed(seed)

    def tensor(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g)).to(device, dtype)

    x = tensor(N, K).requires_grad_()
    w = tensor(M, K, scale=K**-0.5).requires_grad_()
    b = tensor(M).requires_grad_()
    grad_output = tensor(N, M)
    xd, wd, bd = x.detach(), w.detach(), b.detach()

    def eager(x, w, b):
        return eager_activation(F.linear(x, w, b))

    functions = {"handgrad": fused, "eager": eager}
    if "compile" in candidates:
        torch._dynamo.reset()  # a fresh compile for each shape and activation
        functions["compile"] = torch.compile(eager, dynamic=False)

    def train_step(fn):
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), grad_output)

    def inference_step(fn):
        def step():
            with torch.no_grad():
                return fn(xd, wd, bd)

        return step

    def floor_train():
        torch.mm(xd, wd.t())  # f = h Omega^T
        torch.mm(grad_output, wd)  # dl/dh (7.6)
        torch.mm(grad_output.t(), xd)  # dl/dOmega (7.9)

    # One node, three tensors in and their gradients out, and no arithmetic to speak of.
    x1, w1, b1 = tensor(1, 1).requires_grad_(), tensor(1, 1).requires_grad_(), tensor(1).requires_grad_()
    flat = tensor(3)

    def node_train():
        return torch.autograd.grad(torch.cat([x1.view(-1), w1.view(-1), b1]), (x1, w1, b1), flat)

    def node_inference():
        with torch.no_grad():
            return torch.cat([x1.view(-1), w1.view(-1), b1])

    steps = {("fwd+bwd", "floor"): floor_train, ("fwd", "floor"): lambda: torch.mm(xd, wd.t()),
             ("fwd+bwd", "node"): node_train, ("fwd", "node"): node_inference}
    for name, fn in functions.items():
        steps[("fwd+bwd", name)] = train_step(fn)
        steps[("fwd", name)] = inference_step(fn)
    for step in steps.values():  # warm up, and compile
        step()
        step()
    if device == "cuda":
        for mode in ("fwd+bwd", "fwd"):
            for candidate in candidates:
                try:
                    steps[(f"{mode} graph", candidate)] = replay_from_cuda_graph(steps[(mode, candidate)])
                except Exception as error:  # e.g. a compiled function that cannot be captured
                    print(f"  {candidate}: no CUDA graph ({type(error).__name__}: {error})", file=sys.stderr)
                    steps[(f"{mode} graph", candidate)] = None
    return steps


def measure(steps, rounds, min_time_per_round):
    """Median seconds per call of each step, timed round-robin so that drifts in the
    machine's speed touch every candidate alike."""
    threads = torch.get_num_threads()  # Timer would otherwise run on one thread
    timers = {
        key: benchmark.Timer(stmt="step()", globals={"step": fn}, num_threads=threads)
        for key, fn in steps.items()
        if fn is not None
    }
    numbers = {}
    for key, timer in timers.items():  # calls per sample, so a sample lasts min_time_per_round
        start = time.perf_counter()
        timer.timeit(1)
        numbers[key] = max(1, int(min_time_per_round / max(time.perf_counter() - start, 1e-7)))
    samples = {key: [] for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            samples[key].append(timer.timeit(numbers[key]).mean)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {key: medians.get(key, float("nan")) for key in steps}


def mlp(activation, kind, width, layers):
    _, _, fused_module, torch_activation = ACTIVATIONS[activation]
    if kind == "handgrad":
        return nn.Sequential(*[fused_module(width, width) for _ in range(layers)])
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), torch_activation())])


def memory_table(activations, width=256, batch=1024, layers=8):
    rows = []
    x = torch.randn(batch, width, requires_grad=True)
    for activation in activations:
        ours, _ = saved_bytes(mlp(activation, "handgrad", width, layers), x)
        eager, _ = saved_bytes(mlp(activation, "eager", width, layers), x)
        rows.append({"activation": activation, "handgrad_bytes_per_layer": ours / layers,
                     "eager_bytes_per_layer": eager / layers, "ratio": ours / eager})
    return rows, (batch, width, layers)


TABLE_HEADER = (
    "| shape | N,K,M | dtype | activation | mode | floor ms | node ms | handgrad ms | eager ms "
    "| compile ms | handgrad/eager | bound/eager | target | handgrad/floor | eager/floor "
    "| compile/eager |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def bound(r, limit):
    """Seconds no implementation beats: the compute-free node, then the products' FLOPs at
    the FMA limit (GFLOP/s; None where unmeasured, then the node alone)."""
    N, K, M = r["NKM"]
    flops = 2 * N * K * M * (3 if r["mode"].startswith("fwd+bwd") else 1)
    return r["node"] + (flops / (limit * 1e9) if limit else 0.0)


def table_row(r):
    compile_ms = r.get("compile", float("nan"))
    target = TARGETS.get(r["shape"], 1.00) if r["mode"] == "fwd+bwd" and r["device"] == "cpu" else None
    return (
        f"| {r['shape']} | {','.join(map(str, r['NKM']))} | {r['dtype']} | {r['activation']} "
        f"| {r['mode']} "
        f"| {r['floor'] * 1e3:.3f} | {r['node'] * 1e3:.3f} | {r['handgrad'] * 1e3:.3f} "
        f"| {r['eager'] * 1e3:.3f} | {compile_ms * 1e3:.3f} | **{r['handgrad'] / r['eager']:.2f}** "
        f"| {r['bound'] / r['eager']:.2f} | {'-' if target is None else f'{target:.2f}'} "
        f"| {r['handgrad'] / r['floor']:.2f} | {r['eager'] / r['floor']:.2f} "
        f"| {compile_ms / r['eager']:.2f} |"
    )


def results_table(results):
    return "\n".join([TABLE_HEADER] + [table_row(r) for r in results])


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results if r["mode"] == mode]
        several_dtypes = len({r["dtype"] for r in rows}) > 1
        labels = [f"{r['shape']} {r['activation']}" + (f" {r['dtype']}" if several_dtypes else "")
                  for r in rows]
        ratios = [r["handgrad"] / r["eager"] for r in rows]
        compile_ratios = [r.get("compile", float("nan")) / r["eager"] for r in rows]
        positions = range(len(rows))
        ax.bar([p - 0.2 for p in positions], ratios, width=0.4, label="handgrad / eager")
        ax.bar([p + 0.2 for p in positions], compile_ratios, width=0.4, label="torch.compile / eager",
               alpha=0.6)
        ax.axhline(1.0, color="black", linewidth=1)
        if mode == "fwd+bwd" and rows and rows[0]["device"] == "cpu":
            ax.axhline(0.75, color="red", linestyle="--", linewidth=1, label="target 0.75")
        ax.set_xticks(list(positions))
        ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
        ax.set_title(f"{mode}: time relative to eager PyTorch (lower is faster)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("time / eager time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", help="comma-separated names, of " + ", ".join(SHAPES)
                        + " (cpu) or " + ", ".join(GPU_SHAPES) + " (cuda); default: all")
    parser.add_argument("--dtypes", help="default: float32 on cpu, float32,bfloat16 on cuda")
    parser.add_argument("--activations", default=",".join(DEFAULT_ACTIVATIONS),
                        help="comma-separated, of: " + ", ".join(ACTIVATIONS))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved samples per candidate")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per sample")
    parser.add_argument("--out", default="benchmarks/out", help="folder for the JSON and PNG")
    parser.add_argument("--compile", choices=["yes", "no"],
                        help="time torch.compile too (default: yes on cpu, no on cuda, where "
                        "compiling every configuration would not fit a device call)")
    args = parser.parse_args(argv)
    known_shapes = SHAPES if args.device == "cpu" else GPU_SHAPES
    shapes = (args.shapes or ",".join(known_shapes)).split(",")
    dtypes = (args.dtypes or ("float32" if args.device == "cpu" else "float32,bfloat16")).split(",")
    activations = args.activations.split(",")
    for names, known, what in ((shapes, known_shapes, "shape"), (dtypes, DTYPES, "dtype"),
                               (activations, ACTIVATIONS, "activation")):
        for name in names:
            if name not in known:
                parser.error(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    with_compile = (args.compile or ("yes" if args.device == "cpu" else "no")) == "yes"
    candidates = [c for c in CANDIDATES if with_compile or c != "compile"]

    machine = machine_description(args.device)
    limit = fma_limit(torch.get_num_threads()) if args.device == "cpu" else None
    print(f"# handgrad {args.device.upper()} benchmark\n\n{machine}\n", flush=True)
    print("Median time per call; ratios are of medians measured in the same run. Rows are "
          "printed as they are measured. bound/eager: the best ratio any implementation could "
          "reach here (the compute-free node plus the FLOPs at the FMA limit); a target below "
          "it cannot be met.\n", flush=True)
    print(TABLE_HEADER, flush=True)
    results = []
    for dtype in dtypes:
        for shape in shapes:
            for activation in activations:
                steps = make_steps(activation, known_shapes[shape], args.device, DTYPES[dtype],
                                   candidates=candidates)
                medians = measure(steps, args.rounds, args.min_time)
                for mode in dict.fromkeys(key[0] for key in steps):
                    row = {"device": args.device, "shape": shape, "NKM": known_shapes[shape],
                           "dtype": dtype, "activation": activation, "mode": mode}
                    row.update({c: medians[(mode, c)] for c in candidates})
                    row["bound"] = bound(row, limit)
                    results.append(row)
                    print(table_row(row), flush=True)

    memory = []
    if args.device == "cpu":
        memory, (batch, width, layers) = memory_table(activations)
        print(f"\nSaved for backward by an {layers}-layer MLP, width {width}, batch {batch}, "
              "parameters excluded (bytes per layer):\n")
        print("| activation | handgrad | eager | handgrad/eager |\n|---|---|---|---|")
        for m in memory:
            print(f"| {m['activation']} | {m['handgrad_bytes_per_layer']:,.0f} | "
                  f"{m['eager_bytes_per_layer']:,.0f} | {m['ratio']:.2f} |")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{args.device}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": machine, "results": results, "memory": memory}, f, indent=1)
    try:
        plot(results, stem + ".png")
        print(f"\nwrote {stem}.json and {stem}.png")
    except ImportError:
        print(f"\nwrote {stem}.json (no matplotlib: no chart)")
    return results, memory


if __name__ == "__main__":
    main()
