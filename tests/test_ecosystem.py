"""What nn.Linear + activation gives users keeps working: autocast, torch.export,
DistributedDataParallel, threads, and long runs without leaks."""

import faulthandler
import gc
import io
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from samples import (
    FUSED_LAYERS,
    assert_close_to_eager_gradient,
    tolerances,
    twin,
)
from torch import nn

import handgrad.functional as hf
import handgrad.nn as hnn


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_nn_linear(device, fn, reference, dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(5, 8, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        out, expected = fn(x, w, b), reference(x, w, b)
    assert out.dtype == expected.dtype == dtype
    # One rounding to dtype of a float32 sum, as eager's; cuBLAS may pick another order.
    torch.testing.assert_close(out, expected, **tolerances(dtype, summed=device != "cpu"))
    got = torch.autograd.grad(out.float().sum(), (x, w, b))
    want = torch.autograd.grad(expected.float().sum(), (x, w, b))
    for g, e in zip(got, want):
        assert g.dtype == e.dtype == torch.float32
        if device == "cpu":
            torch.testing.assert_close(g, e, **tolerances(dtype))  # computed in dtype
        else:
            assert_close_to_eager_gradient(g, e, dtype)


def test_autocast_leaves_standalone_activations_alone_as_torch_does():
    x = torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hf.relu(x).dtype == F.relu(x).dtype == torch.float32
        assert hf.sigmoid(x).dtype == torch.sigmoid(x).dtype == torch.float32


def test_autocast_leaves_float64_alone_as_it_does_for_nn_linear():
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in ((3, 4), (2, 4), (2,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hf.linear_relu(x, w, b).dtype == F.linear(x, w, b).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_of_the_mlp_matches_its_torch_nn_twin(dtype):
    torch.manual_seed(0)
    model = hnn.MLP([6, 8, 3])
    reference = twin(model)
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=dtype):
        out, expected = model(x), reference(x)
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grads = torch.autograd.grad(out.float().sum(), list(model.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        hnn.LinearReLU(8, 16), hnn.LinearLeakyReLU(16, 16, negative_slope=-0.2),
        hnn.LinearSigmoid(16, 12), hnn.LeakyReLU(0.1), nn.Linear(12, 4), hnn.ReLU(inplace=True),
        hnn.Sigmoid(),
    )


def test_export_save_load_run():
    model = make_model()
    x = torch.randn(5, 8)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "handgrad.linear_activation.default" in targets
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for batch in (x, torch.randn(5, 8)):
        torch.testing.assert_close(loaded.module()(batch), model(batch))


def test_threads_give_serial_results():
    model = make_model()
    inputs = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def step(x):
        out = model(x)
        return (out.detach(), *torch.autograd.grad(out.square().sum(), list(model.parameters())))

    serial = [step(x) for x in inputs]
    concurrent = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def worker(i):
        barrier.wait()
        for _ in range(5):
            concurrent[i] = step(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(concurrent, serial):
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's quarantine holds freed memory by design")
def test_ten_thousand_steps_do_not_grow_memory():
    model = make_model()
    x = torch.randn(16, 8, requires_grad=True)

    def steps(n):
        for _ in range(n):
            torch.autograd.grad(model(x).sum(), [x, *model.parameters()])

    steps(1000)  # warm up the allocator and autograd's caches
    before = resident_bytes()
    steps(10_000)
    growth = resident_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def _ddp_worker(rank, world_size, store_path, x, y, out_path):
    faulthandler.enable()  # a crash in the teardown prints where each thread was
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(make_model())
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    F.mse_loss(model(x[shard]), y[shard]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out_path)
    del model  # so that destroy_process_group, not the interpreter's teardown, ends the group
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_processes_match_full_batch_gradients(tmp_path):
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.rand(32, 4)
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), x, y, out_path), nprocs=2, join=True)
    model = make_model()
    F.mse_loss(model(x), y).backward()
    for got, want in zip(torch.load(out_path), [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)
