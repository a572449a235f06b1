"""handgrad under torch.distributed, on CPU processes with gloo (a copy-and-adapt example).

1. The figure 7.8 network (10-40-40-5, fused LinearReLU layers) trained with DDP: each
   process takes its share of every batch.
2. handgrad.nn.MLP trained with FSDP2 and tensor parallelism: on a 2-D mesh (data x model)
   when there are at least 4 processes, else FSDP2 and tensor parallelism one at a time.

Each run's losses are compared with a single-process run of the same model on the whole
batch, and the largest difference is printed.

    python -m handgrad.examples.distributed [--processes N] [--steps S]
    torchrun --nproc-per-node N -m handgrad.examples.distributed
"""

import argparse
import datetime
import gc
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import handgrad.nn as hnn

BATCH = 20  # two of the chapter's batches of 10, split among the processes


def fig7_8(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(hnn.LinearReLU(10, 40), hnn.LinearReLU(40, 40), nn.Linear(40, 5))


def mlp(seed=0):
    torch.manual_seed(seed)
    return hnn.MLP([10, 40, 40, 5])


def batches(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 10, generator=generator), torch.randn(BATCH, 5, generator=generator))
            for _ in range(steps)]


def train(model, data, shard=None):
    """SGD with momentum on the mean squared error; each step's loss over the whole batch.
    shard picks this process's rows of a batch (data parallelism), or None for all of them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        if shard is not None:
            x, y = shard(x), shard(y)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    losses = torch.stack(losses)
    if shard is not None:  # the batch was split evenly: the whole batch's loss is the mean
        dist.all_reduce(losses)  # of the processes' losses (each counted as often as its rows)
        losses /= dist.get_world_size()
    return losses


def tensor_parallel_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # hidden.0 column-wise (its output stays sharded by features), hidden.1 row-wise: the
    # fused row-wise layer gathers its input first (a fused layer never gives a Partial sum).
    return {"hidden.0": ColwiseParallel(), "hidden.1": RowwiseParallel()}


def runs(world, steps):
    """(name, the distributed losses, the single-process losses) of each run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    rank, data = dist.get_rank(), batches(steps)

    def my_rows(t):
        return t.chunk(world)[rank]

    yield ("figure 7.8, DDP", train(nn.parallel.DistributedDataParallel(fig7_8()), data, my_rows),
           train(fig7_8(), data))
    if world >= 4 and world % 2 == 0:
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("data", "model"))
        model = parallelize_module(mlp(), mesh["model"], tensor_parallel_plan())
        for layer in model.hidden:
            fully_shard(layer, mesh=mesh["data"])
        fully_shard(model, mesh=mesh["data"])
        rows = mesh["data"].get_local_rank()

        def data_rows(t):
            return t.chunk(world // 2)[rows]

        yield "MLP, FSDP2 x TP (2-D mesh)", train(model, data, data_rows), train(mlp(), data)
        return
    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    for layer in model.hidden:
        fully_shard(layer, mesh=mesh)
    yield "MLP, FSDP2", train(fully_shard(model, mesh=mesh), data, my_rows), train(mlp(), data)
    yield ("MLP, tensor parallel", train(parallelize_module(mlp(), mesh, tensor_parallel_plan()), data),
           train(mlp(), data))


def worker(rank, world, store, steps):
    torch.set_num_threads(1)
    if store is None:  # started by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    else:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    world = dist.get_world_size()
    all_match = True
    for name, got, want in runs(world, steps):
        difference = (got - want).abs().max().item()
        match = torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        all_match &= match
        if dist.get_rank() == 0:
            print(f"{name:28s} first loss {got[0].item():.6f}, last {got[-1].item():.6f}; "
                  f"single process {want[0].item():.6f} .. {want[-1].item():.6f}; "
                  f"largest difference {difference:.1e}: {'match' if match else 'DIFFERENT'}",
                  flush=True)
    # Free the models first: a process group still held (DDP holds one) ends in the interpreter's
    # teardown instead, where gloo's threads can abort the process.
    gc.collect()
    dist.destroy_process_group()
    if not all_match:
        raise SystemExit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="processes to start (not under torchrun)")
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # torchrun started this process
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args.steps)
        return
    if args.processes < 1 or BATCH % args.processes:
        parser.error(f"--processes must divide the batch of {BATCH}, got {args.processes}")
    import torch.multiprocessing as mp

    print(f"{args.processes} gloo processes on this machine, {args.steps} steps, batches of {BATCH}")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args.processes, os.path.join(folder, "store"), args.steps),
                 nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
