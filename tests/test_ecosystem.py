"""What nn.Linear + activation gives users keeps working: autocast, torch.export, TorchScript,
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
    CASES,
    FUSED_LAYERS,
    assert_close_to_eager_gradient,
    tolerances,
    twin,
)
from torch import nn

import handgrad
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


class _Deployed(nn.Module):
    """What a user deploys: handgrad's layers, an MLP with an output activation, and a fused
    torch.nn network, in one program."""

    def __init__(self):
        super().__init__()
        self.layers = make_model()
        self.mlp = hnn.MLP([4, 16, 16, 3], activation="leaky_relu", negative_slope=0.1,
                           output_activation="sigmoid")
        torch.manual_seed(1)
        self.fused = handgrad.fuse(nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                                                 nn.Linear(12, 2)))

    def forward(self, x):
        return self.fused(self.mlp(self.layers(x)))


def test_aot_inductor_package_runs_the_ops_as_eager_does(tmp_path):
    # AOTInductor, the way to deploy an exported program without Python: the package calls
    # handgrad's ops through the dispatcher, for any batch size the export allowed.
    model = _Deployed().eval()
    x = torch.randn(5, 8)
    model(x)  # fuse() decides on its first call
    batch = torch.export.Dim("batch", min=2, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"handgrad.linear_activation.default", "handgrad.mlp.default"} <= targets
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    for rows in (5, 3, 257):
        batch_input = torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(loaded(batch_input), model(batch_input), rtol=0, atol=0)


def _handgrad_targets(program):
    """handgrad's ops that program calls, directly or through a higher-order op
    (auto_functionalized_v2(handgrad.activation_.default, ...))."""
    found = set()
    for node in program.graph.nodes:
        if node.op == "call_function":
            found.update(str(t) for t in (node.target, *node.args[:1]) if str(t).startswith("handgrad."))
    return found


def _decomposed(program):
    table = torch.export.default_decompositions()
    table.update(handgrad.decompositions())
    return program.run_decompositions(table)


def test_decompositions_leave_torch_ops_that_compute_the_same():
    # For runtimes with torch's ops only (ONNX, ExecuTorch): the in-place activation exports
    # as torch's in-place ops do (the op and a functional copy), so nothing of handgrad's is left.
    model = _Deployed().eval()
    x = torch.randn(5, 8)
    model(x)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    assert {"handgrad.linear_activation.default", "handgrad.activation.default",
            "handgrad.mlp.default"} <= _handgrad_targets(program)
    decomposed = _decomposed(program)
    assert not _handgrad_targets(decomposed)
    for rows in (5, 3, 257):
        batch = torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(decomposed.module()(batch), model(batch))


EVERY_ACTIVATION = [("relu", {}), ("leaky_relu", {"negative_slope": 0.2}), ("sigmoid", {}), ("tanh", {}),
                    ("silu", {}), ("gelu", {}), ("gelu_tanh", {}), ("softplus", {"beta": 4.0, "threshold": 1.5})]


@pytest.mark.parametrize("activation,parameters", EVERY_ACTIVATION, ids=[a for a, _ in EVERY_ACTIVATION])
def test_decompositions_of_every_activation_and_its_parameters(activation, parameters):
    torch.manual_seed(0)
    mlp = hnn.MLP([4, 8, 8, 3], activation=activation, output_activation=activation, **parameters)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):  # the network's op, one layer's op, the elementwise op
            a = torch.ops.handgrad.activation(x[:, :4], activation, parameters.get("negative_slope", 0.01),
                                              parameters.get("beta", 1.0), parameters.get("threshold", 20.0))
            return self.mlp(a) + self.mlp.hidden[0](x[:, 4:])[:, :3]

    model = Model().eval()
    x = torch.randn(6, 8) * 3
    decomposed = _decomposed(torch.export.export(model, (x,)))
    assert not _handgrad_targets(decomposed)
    torch.testing.assert_close(decomposed.module()(x), model(x))


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


# --- TorchScript: torch.jit.script compiles the modules, and fused models, as it does torch.nn's ---

# torch deprecates TorchScript (it warns on each script, save and load) but still ships it.
torchscript = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


def _module_pair(name, parameters):
    """The fused layer (as handgrad.nn.MLP builds its hidden layers) and the standalone
    activation module for an activation case."""
    layer = hnn.MLP([6, 5, 1], activation=name, dtype=torch.float64, **parameters).hidden[0]
    kwargs = {"approximate": "tanh"} if name == "gelu_tanh" else parameters
    activation = {"relu": hnn.ReLU, "leaky_relu": hnn.LeakyReLU, "sigmoid": hnn.Sigmoid, "tanh": hnn.Tanh,
                  "silu": hnn.SiLU, "gelu": hnn.GELU, "gelu_tanh": hnn.GELU, "softplus": hnn.Softplus}[name](**kwargs)
    return layer, activation


def _scripted_and_reloaded(module):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _results_and_gradients(module, x):
    """module(x), and the gradients of a gradient penalty of it: d/dx, then d/dparameters of
    |d/dx|^2 (the double backward)."""
    x = x.clone().requires_grad_()
    out = module(x)
    grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    parameters = list(module.parameters())
    second = torch.autograd.grad(grad_x.square().sum(), parameters, allow_unused=True) if parameters else []
    return [out.detach(), grad_x.detach(), *(torch.zeros(()) if g is None else g for g in second)]


@torchscript
@pytest.mark.parametrize("name,parameters", [pytest.param(n, p, id=f"{n}{s}") for n, p, s in CASES])
def test_torchscript_modules_give_eagers_bits(name, parameters):
    torch.manual_seed(0)
    layer, activation = _module_pair(name, parameters)
    x = torch.randn(7, 6, dtype=torch.float64)
    for module in (layer, activation, nn.Sequential(layer, activation)):
        scripted = _scripted_and_reloaded(module)
        for got, want in zip(_results_and_gradients(scripted, x), _results_and_gradients(module, x)):
            assert torch.equal(got, want)


@torchscript
@pytest.mark.parametrize("inplace_module", [hnn.ReLU(inplace=True), hnn.SiLU(inplace=True),
                                            hnn.LeakyReLU(0.2, inplace=True)], ids=["relu", "silu", "leaky_relu"])
def test_torchscript_inplace_activations_overwrite_their_input(inplace_module):
    x = torch.randn(4, 5)
    want = inplace_module(x.clone())
    y = x.clone()
    out = _scripted_and_reloaded(inplace_module)(y)
    assert torch.equal(y, want) and out.data_ptr() == y.data_ptr()


@torchscript
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"checkpoint_every": 1},
                                    {"output_activation": "sigmoid"},
                                    {"activation": "leaky_relu", "negative_slope": -0.3, "output_activation": "leaky_relu"},
                                    {"activation": "gelu_tanh"},
                                    {"activation": "softplus", "beta": 3.0, "threshold": 2.0, "output_activation": "softplus"}],
                         ids=["relu", "no_bias", "checkpointed", "sigmoid_output", "leaky_relu", "gelu_tanh", "softplus"])
def test_torchscript_mlp_runs_the_one_op_as_eager(kwargs):
    torch.manual_seed(0)
    mlp = hnn.MLP([6, 5, 4, 3], dtype=torch.float64, **kwargs)
    scripted = _scripted_and_reloaded(mlp)
    assert "handgrad::mlp" in str(scripted.inlined_graph)
    x = torch.randn(9, 6, dtype=torch.float64)
    for got, want in zip(_results_and_gradients(scripted, x), _results_and_gradients(mlp, x)):
        assert torch.equal(got, want)


def _doubled(module: hnn.LinearReLU, input: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return 2 * output


@torchscript
def test_torchscript_mlp_calls_its_layers_where_one_has_a_hook():
    torch.manual_seed(0)
    mlp = hnn.MLP([6, 5, 4, 3], dtype=torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)
    plain = mlp(x)
    mlp.hidden[1].register_forward_hook(_doubled)
    hooked = mlp(x)
    assert not torch.allclose(hooked, plain)
    torch.testing.assert_close(torch.jit.script(mlp)(x), hooked, rtol=0, atol=0)
    mlp.hidden[1]._forward_hooks.clear()  # scripted again without it: the one op
    assert "handgrad::mlp" in str(torch.jit.script(mlp).inlined_graph)


class _CallsRelu(nn.Module):
    """A model whose forward calls F.relu: fuse() fuses it through a traced program."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.fc1, self.fc2 = nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.body(x))))


@torchscript
def test_torchscript_of_a_fused_model_gives_its_results_and_leaves_it_fused():
    torch.manual_seed(0)
    model = _CallsRelu().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    want = model(x)
    hnn.fuse(model)
    scripted = _scripted_and_reloaded(model)
    torch.testing.assert_close(scripted(x), want)
    # The nn.Sequential pair stays fused; the calls in forward run unfused.
    assert str(scripted.inlined_graph).count("handgrad::linear_activation") == 1
    assert "forward" in model.__dict__  # the eager model still runs its fused program
    torch.testing.assert_close(model(x), want)


@torchscript
def test_torchscript_functional_errors_name_the_argument():
    gelu = torch.jit.script(hf.gelu)
    with pytest.raises(Exception, match="approximate must be 'none' or 'tanh', got 'erf'"):
        gelu(torch.randn(3), "erf")
    layer = torch.jit.script(hf.linear_leaky_relu)
    with pytest.raises(RuntimeError, match="negative_slope must be a finite number"):
        layer(torch.randn(2, 3), torch.randn(4, 3), None, float("nan"))
    with pytest.raises(RuntimeError, match="weight has 5 columns but input has 3 features"):
        layer(torch.randn(2, 3), torch.randn(4, 5), None, 0.1)


@torchscript
def test_torchscript_refuses_forward_ad_and_says_eager_mode_carries_it():
    # Eager mode runs forward-mode AD through the Python Functions; TorchScript reaches the
    # ops, which have no forward derivative: a clear refusal, not a wrong tangent.
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    modules = [hnn.MLP([3, 4, 2]), hnn.LinearSigmoid(3, 2), hnn.GELU()]
    for module in modules:
        scripted = torch.jit.script(module)
        x, tangent = torch.randn(5, 3), torch.randn(5, 3)
        with fwAD.dual_level():
            eager_tangent = fwAD.unpack_dual(module(fwAD.make_dual(x, tangent))).tangent
            assert eager_tangent is not None  # eager mode carries it
            with pytest.raises(RuntimeError, match=r"has no forward derivative; .* support it in eager mode"):
                scripted(fwAD.make_dual(x, tangent))
