"""handgrad under torch.distributed: two gloo processes on loopback, each case compared with a
single-process run of the same model (and, where a torch.nn twin exists, run the same way).

All cases run in one pair of processes (starting them costs more than the cases), one after
another, with every wait bounded: the process group times out after 60 s and the whole run
after RUN_SECONDS. Each case is then reported as its own test.
"""

import datetime
import faulthandler
import gc
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from samples import fused_layer
from torch import nn

import handgrad.functional as F
import handgrad.nn as hnn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
RUN_SECONDS = 240
CASES = {}


def case(function):
    CASES[function.__name__] = function
    return function


def assert_close(got, want, **tolerances):
    from torch.distributed.tensor import DTensor

    if isinstance(got, DTensor):
        got = got.full_tensor()
    torch.testing.assert_close(got, want, **tolerances)


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def rows_of(x, rank):
    """This rank's share of a batch, as DDP and FSDP are fed."""
    return x.chunk(WORLD)[rank]


# --- The functional ops on DTensors ---

def _placements():
    from torch.distributed.tensor import Replicate, Shard

    R = Replicate()
    # (input, weight, bias): replicated, batch-sharded, column-wise, row-wise
    return [(R, R, R), (Shard(0), R, R), (R, Shard(0), Shard(0)), (Shard(1), Shard(1), R)]


LAYERS = {name: fused_layer(name, negative_slope=-0.5) for name in ("relu", "sigmoid", "leaky_relu")}


def _check_fused_layer(layer, placements, m):
    """Forward, backward and double backward of a fused layer on DTensors against plain
    tensors, in float64."""
    from torch.distributed.tensor import Partial, distribute_tensor

    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((8, 6), (4, 6), (4,)))
    d = [distribute_tensor(t.detach(), m, [p]).requires_grad_() for t, p in zip((x, w, b), placements)]
    out = layer(*d)
    assert not any(isinstance(p, Partial) for p in out.placements), out.placements
    assert_close(out, layer(x, w, b))
    # backward, with create_graph, then a second backward of dl/dh alone (the other first
    # gradients' gradients are undefined: none may be made of plain zeros)
    want = torch.autograd.grad(layer(x, w, b).sin().sum(), (x, w, b), create_graph=True)
    got = torch.autograd.grad(out.sin().sum(), d, create_graph=True)
    for g, r in zip(got, want):
        assert_close(g, r)
    want2 = torch.autograd.grad(want[0].sum(), (x, w, b), allow_unused=True)
    got2 = torch.autograd.grad(got[0].sum(), d, allow_unused=True)
    for g, r in zip(got2, want2):
        assert (g is None) == (r is None)
        if r is not None:
            assert_close(g, r)
    # a plain backward: one fused backward op on DTensors
    grads = torch.autograd.grad(layer(*d).square().sum(), d)
    for g, r in zip(grads, torch.autograd.grad(layer(x, w, b).square().sum(), (x, w, b))):
        assert_close(g, r)


@case
def fused_layers_on_dtensors(rank, m, tmp):
    for activation, layer in LAYERS.items():
        for placements in _placements():
            try:
                _check_fused_layer(layer, placements, m)
            except Exception as error:
                raise AssertionError(f"{activation} with {placements}") from error


@case
def activations_on_dtensors(rank, m, tmp):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for placement in (Replicate(), Shard(0), Shard(1)):
        dx = distribute_tensor(x.detach(), m, [placement]).requires_grad_()
        for ours, theirs in ((F.sigmoid, torch.sigmoid), (F.relu, torch.relu),
                             (lambda t: F.leaky_relu(t, -0.3), lambda t: nn.functional.leaky_relu(t, -0.3))):
            out = ours(dx)
            assert out.placements == (placement,)
            assert_close(out, theirs(x))
            (g,) = torch.autograd.grad(out.square().sum(), dx, create_graph=True)
            (r,) = torch.autograd.grad(theirs(x).square().sum(), x, create_graph=True)
            assert_close(g, r)
            assert_close(torch.autograd.grad(g.sum(), dx)[0], torch.autograd.grad(r.sum(), x)[0])
        # in place, in a graph: the gradient flows through the overwritten tensor
        y = dx * 1
        assert F.relu(y, inplace=True) is y and y.placements == (placement,)
        assert_close(y, torch.relu(x))
        assert_close(torch.autograd.grad(y.sum(), dx)[0], (x > 0).double())


@case
def mlp_on_dtensors(rank, m, tmp):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
               torch.randn(3, 5, dtype=torch.float64, requires_grad=True)]
    biases = [torch.randn(5, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True)]
    want = F.mlp(x, weights, biases, "sigmoid")
    want_grads = torch.autograd.grad(want.square().sum(), [x, *weights, *biases])
    R = Replicate()
    for input_placement, weight_placement, every in ((R, R, None), (Shard(0), R, None),
                                                     (Shard(0), Shard(0), 1), (Shard(1), Shard(1), None)):
        def place(tensors, p):
            return [distribute_tensor(t.detach(), m, [p]).requires_grad_() for t in tensors]

        dx, = place([x], input_placement)
        dw, db = place(weights, weight_placement), place(biases, R)
        out = F.mlp(dx, dw, db, "sigmoid", checkpoint_every=every)
        assert_close(out, want)
        grads = torch.autograd.grad(out.square().sum(), [dx, *dw, *db])
        for g, r, t in zip(grads, want_grads, [dx, *dw, *db]):
            assert g.placements == t.placements  # each gradient placed as its tensor
            assert_close(g, r)
        with torch.no_grad():  # the one `mlp` op, by its sharding rule
            assert_close(F.mlp(dx, dw, db, "sigmoid"), want)
    # a DTensor input with plain parameters: one error that says what to do
    with pytest.raises(TypeError, match="DTensor and plain torch.Tensor arguments together"):
        torch.ops.handgrad.mlp_forward(dx, [w.detach() for w in weights], [], "relu", 0.01, 0)
    # double backward
    (r1,) = torch.autograd.grad(F.mlp(x, weights, biases).square().sum(), weights[0], create_graph=True)
    dw = [distribute_tensor(t.detach(), m, [R]).requires_grad_() for t in weights]
    db = [distribute_tensor(t.detach(), m, [R]).requires_grad_() for t in biases]
    dx = distribute_tensor(x.detach(), m, [Shard(0)])
    (g1,) = torch.autograd.grad(F.mlp(dx, dw, db).square().sum(), dw[0], create_graph=True)
    assert_close(torch.autograd.grad(g1.sum(), dw[1])[0], torch.autograd.grad(r1.sum(), weights[1])[0])


@case
def a_wrong_partial_rule_is_caught(rank, m, tmp):
    """A rule that lets a fused layer give a Partial output is wrong (relu(a + b) !=
    relu(a) + relu(b)); the comparison these tests make catches it."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    import handgrad._distributed as rules

    op = torch.ops.handgrad.linear_activation.default
    row_wise = (Shard(1), Shard(1), Replicate())

    def clear_cache():  # DTensor caches its sharding decisions in Python and in C++
        propagate = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding
        if hasattr(propagate, "cache_clear"):
            propagate.cache_clear()
        if hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"):
            torch._C._clear_DTensor_sharding_propagator_cache()

    register_sharding(op)(lambda input, weight, bias, *_: [([Partial()], [Shard(1), Shard(1), Replicate()])])
    clear_cache()
    try:
        with pytest.raises(AssertionError):
            _check_fused_layer(LAYERS["relu"], row_wise, m)
    finally:
        register_sharding(op)(rules._linear_activation_rule)
        clear_cache()
    _check_fused_layer(LAYERS["relu"], row_wise, m)


# --- Models under the engines ---

class Fig78Calls(nn.Module):
    """Figure 7.8's network with its activations called in forward: fuse() traces it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(10, 40), nn.Linear(40, 40), nn.Linear(40, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


KINDS = ("handgrad", "mlp", "fuse", "fuse calls")


def fig7_8(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "torch":
        return nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))
    if kind == "handgrad":
        return nn.Sequential(hnn.LinearReLU(10, 40), hnn.LinearReLU(40, 40), nn.Linear(40, 5))
    if kind == "mlp":
        return hnn.MLP([10, 40, 40, 5])
    if kind == "fuse calls":
        return hnn.fuse(Fig78Calls())
    return hnn.fuse(fig7_8("torch", seed))


def data(seed=1, rows=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 10, generator=generator), torch.randn(rows, 5, generator=generator)


def train(model, x, y, steps=3, lr=0.1):
    """SGD steps on the mean squared error of (x, y); the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def global_loss(local_loss):
    """The mean of the ranks' losses: the full batch's loss when the batch is split evenly."""
    loss = local_loss.clone()
    dist.all_reduce(loss)
    return loss / WORLD


def full_state(model):
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


@case
def ddp(rank, m, tmp):
    x, y = data()
    for kind in KINDS:
        want = train(fig7_8(kind), x, y)
        model = nn.parallel.DistributedDataParallel(fig7_8(kind))
        got = global_loss(train(model, rows_of(x, rank), rows_of(y, rank)))
        assert_close(got, want)
        assert_close(full_state(model.module), full_state(_trained(kind, x, y)))


def _trained(kind, x, y, steps=3):
    model = fig7_8(kind)
    train(model, x, y, steps)
    return model


@case
def fsdp2_per_layer_and_root_bf16(rank, m, tmp):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    x, y = data()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for kind in KINDS:
        for per_layer in (True, False):
            twin = fig7_8("torch")
            model = fig7_8(kind)
            for net in (twin, model):
                if per_layer:  # (fully_shard's hooks on a Linear that fuse() fused as a call unfuse it)
                    for layer in (net.hidden if isinstance(net, hnn.MLP) else
                                  [l for l in net.children() if isinstance(l, nn.Linear)]):
                        fully_shard(layer, mesh=m, mp_policy=policy)
                fully_shard(net, mesh=m, mp_policy=policy)
            got = global_loss(train(model, rows_of(x, rank), rows_of(y, rank)))
            want = global_loss(train(twin, rows_of(x, rank), rows_of(y, rank)))
            # bf16 products: as close to the torch.nn twin as bf16 allows, and to fp32
            assert_close(got, want, rtol=2e-2, atol=2e-3)
            assert_close(got, train(fig7_8(kind), x, y), rtol=3e-2, atol=3e-3)


@case
def dcp_save_then_load_into_torch_nn(rank, m, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    x, y = data()
    model = fig7_8("fuse")
    fully_shard(model, mesh=m)
    train(model, rows_of(x, rank), rows_of(y, rank))
    path = os.path.join(tmp, "dcp")
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    plain = fig7_8("torch", seed=7)  # other weights, all to be overwritten
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=path)
    plain.load_state_dict(state)
    assert_close(plain(x), _trained("torch", x, y)(x), rtol=1e-5, atol=1e-6)


def _tensor_parallel(kind, output_replicated):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = fig7_8(kind)
    if kind == "mlp":
        names = ("hidden.0", "hidden.1")
    elif kind == "fuse":
        names = ("0", "2")
    elif kind == "fuse calls":  # the plan's hooks on the Linear layers unfuse them
        names = ("fc1", "fc2")
    else:
        names = ("0", "1")
    if output_replicated:  # each layer column-wise, its output all-gathered
        plan = {name: ColwiseParallel(output_layouts=Replicate()) for name in names}
    else:  # column-wise, then row-wise: the fused row-wise layer gathers its input first
        plan = {names[0]: ColwiseParallel(), names[1]: RowwiseParallel()}
    return parallelize_module(model, mesh(), plan)


@case
def tensor_parallel_colwise_then_rowwise(rank, m, tmp):
    x, y = data()
    for kind in KINDS:
        for output_replicated in (False, True):
            want = train(fig7_8(kind), x, y)
            model = _tensor_parallel(kind, output_replicated)
            got = train(model, x, y)
            assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert_close(full_state(model), full_state(_trained(kind, x, y)), rtol=1e-5, atol=1e-6)


@case
def mlp_with_per_layer_activation_checkpointing(rank, m, tmp):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing, checkpoint_wrapper)

    x, y = data()
    want = _trained("mlp", x, y)
    for wrap in ("apply", "wrapper"):
        model = fig7_8("mlp")
        calls, forward = [], model.hidden[0].forward
        model.hidden[0].forward = lambda h: (calls.append(1), forward(h))[1]
        if wrap == "apply":
            apply_activation_checkpointing(model, check_fn=lambda layer: isinstance(layer, hnn.LinearReLU))
        else:
            model.hidden[1] = checkpoint_wrapper(model.hidden[1])
        ddp_model = nn.parallel.DistributedDataParallel(model)
        got = global_loss(train(ddp_model, rows_of(x, rank), rows_of(y, rank)))
        assert_close(got, train(fig7_8("mlp"), x, y))
        unwrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in full_state(model).items()}
        assert_close(unwrapped, full_state(want))
        # 3 forwards, and with hidden.0 wrapped 3 recomputations in the backward
        assert len(calls) == (6 if wrap == "apply" else 3)


# --- The harness ---

def _worker(rank, store, tmp, names):
    faulthandler.enable()  # a crash in the teardown prints where each thread was
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    m = mesh()
    outcomes = {}
    for name in names:
        try:
            CASES[name](rank, m, tmp)
            outcomes[name] = None
        except BaseException:
            outcomes[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)
    gc.collect()  # the cases' models, so that destroy_process_group ends the groups they held
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("distributed"))
    context = mp.start_processes(_worker, args=(os.path.join(tmp, "store"), tmp, list(CASES)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + RUN_SECONDS
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed run took over {RUN_SECONDS} s")
    results = []
    for rank in range(WORLD):
        with open(os.path.join(tmp, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_distributed(outcomes, name):
    for rank, results in enumerate(outcomes):
        assert results[name] is None, f"rank {rank}:\n{results[name]}"


@pytest.mark.parametrize("order", ["handgrad first", "DTensor first"])
def test_the_rules_are_registered_in_either_import_order(order):
    imports = ["import handgrad", "import torch.distributed.tensor"]
    if order == "DTensor first":
        imports.reverse()
    program = "; ".join(imports + [
        "import torch",
        "from torch.distributed.tensor import DTensor",
        "table = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs",
        "handlers = DTensor._op_dispatcher._custom_op_handlers",
        "ops = torch.ops.handgrad",
        "assert all(getattr(ops, n).default in table for n in ('linear_activation', "
        "'linear_activation_backward', 'activation', 'activation_', 'activation_backward', "
        "'bias_activation_backward', 'mlp'))",
        "assert ops.mlp_forward.default in handlers and ops.mlp_backward.default in handlers",
    ])
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)


def test_the_example_trains_to_the_single_process_losses():
    result = subprocess.run([sys.executable, "-m", "handgrad.examples.distributed", "--steps", "3"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "largest difference" in line]
    assert len(lines) == 3 and all(line.endswith(": match") for line in lines), result.stdout
