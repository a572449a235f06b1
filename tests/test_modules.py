"""The modules are drop-ins for nn.Linear + activation, and fuse() rewrites models."""

import copy
import io

import pytest
import torch
from torch import nn

import handgrad.nn as hnn
from samples import handgrad_ops

FUSED_MODULES = [
    (hnn.LinearReLU, {}, nn.ReLU()),
    (hnn.LinearLeakyReLU, {"negative_slope": 0.2}, nn.LeakyReLU(0.2)),
    (hnn.LinearSigmoid, {}, nn.Sigmoid()),
    (hnn.LinearTanh, {}, nn.Tanh()),
    (hnn.LinearSiLU, {}, nn.SiLU()),
    (hnn.LinearGELU, {"approximate": "tanh"}, nn.GELU(approximate="tanh")),
    (hnn.LinearSoftplus, {"beta": 100.0, "threshold": 15.0}, nn.Softplus(100.0, 15.0)),
]
IDS = ["relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu_tanh", "softplus"]


@pytest.mark.parametrize("cls,kwargs,activation", FUSED_MODULES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_initialised_exactly_as_nn_linear(cls, kwargs, activation, bias):
    torch.manual_seed(3)
    ours = cls(20, 30, bias=bias, **kwargs)
    torch.manual_seed(3)
    reference = nn.Linear(20, 30, bias=bias)
    assert [name for name, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    x = torch.randn(4, 20)
    torch.testing.assert_close(ours(x), activation(reference(x)))


@pytest.mark.parametrize("cls,kwargs,activation", FUSED_MODULES, ids=IDS)
def test_state_dict_exchanges_with_nn_linear(cls, kwargs, activation):
    reference = nn.Linear(6, 5)
    ours = cls(6, 5, **kwargs)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), activation(reference(x)))
    back = nn.Linear(6, 5)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, reference.weight) and torch.equal(back.bias, reference.bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_arguments(dtype):
    layer = hnn.LinearReLU(4, 3, device="cpu", dtype=dtype)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    assert layer(torch.randn(2, 4, dtype=dtype)).dtype == dtype


def test_repr():
    assert repr(hnn.LinearReLU(3, 4)) == "LinearReLU(in_features=3, out_features=4, bias=True)"
    assert repr(hnn.LinearSigmoid(3, 4, bias=False)) == "LinearSigmoid(in_features=3, out_features=4, bias=False)"
    assert (repr(hnn.LinearLeakyReLU(3, 4, negative_slope=0.2))
            == "LinearLeakyReLU(in_features=3, out_features=4, bias=True, negative_slope=0.2)")
    assert repr(hnn.LeakyReLU(0.3)) == "LeakyReLU(negative_slope=0.3)"
    assert repr(hnn.ReLU()) == "ReLU()" and repr(hnn.Sigmoid()) == "Sigmoid()"
    assert (repr(hnn.LinearSoftplus(3, 4, beta=100))
            == "LinearSoftplus(in_features=3, out_features=4, bias=True, beta=100.0, threshold=20.0)")
    assert repr(hnn.Softplus(2.0, 5.0)) == repr(nn.Softplus(2.0, 5.0)) == "Softplus(beta=2.0, threshold=5.0)"


@pytest.mark.parametrize("ours,reference", [
    (hnn.ReLU(), nn.ReLU()), (hnn.LeakyReLU(0.05), nn.LeakyReLU(0.05)), (hnn.Sigmoid(), nn.Sigmoid()),
    (hnn.Tanh(), nn.Tanh()), (hnn.SiLU(), nn.SiLU()), (hnn.GELU("tanh"), nn.GELU("tanh")),
    (hnn.Softplus(100.0, 15.0), nn.Softplus(100.0, 15.0)),
], ids=IDS)
def test_activation_modules(ours, reference):
    x = torch.randn(2, 3, 4, requires_grad=True)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(torch.autograd.grad(ours(x).sum(), x)[0], torch.autograd.grad(reference(x).sum(), x)[0])


def test_default_slope_is_pytorchs():
    assert hnn.LinearLeakyReLU(2, 2).negative_slope == nn.LeakyReLU().negative_slope == 0.01
    assert hnn.LeakyReLU().negative_slope == 0.01


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 12), nn.Sigmoid()),
        nn.Linear(12, 10, bias=False), nn.ReLU(inplace=True),
        nn.Linear(10, 4), nn.ELU(),  # not fusable
        nn.Linear(4, 4),
    )


def test_fuse_runs_pairs_fused_shares_parameters_and_keeps_outputs():
    model = make_model()
    reference = copy.deepcopy(model)
    parameters_before = [p for p in model.parameters()]
    fused = hnn.fuse(model)
    assert fused is model
    # The modules stay as they are; the containers' forwards run the pairs fused.
    assert [type(m) for m in fused.modules()] == [type(m) for m in reference.modules()]
    assert [d.name for d in hnn.fusion_decisions(fused) if d.fused] == ["0", "2.0", "2.2", "3"]
    assert handgrad_ops(fused, torch.randn(5, 8)) == ["linear_activation"] * 4
    # Same Parameter objects, so optimizers built before fusing keep working.
    assert all(a is b for a, b in zip(fused.parameters(), parameters_before))
    # Same state_dict keys, so checkpoints load either way.
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(fused(x), reference(x))
    grads = torch.autograd.grad(fused(x).sum(), list(fused.parameters()))
    expected = torch.autograd.grad(reference(x).sum(), list(reference.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_fuse_leaves_other_models_alone():
    model = nn.Sequential(nn.ReLU(), nn.Linear(3, 3), nn.ELU())
    hnn.fuse(model)
    assert [type(m) for m in model] == [nn.ReLU, nn.Linear, nn.ELU]
    already = nn.Sequential(hnn.LinearReLU(3, 3), nn.ReLU())
    hnn.fuse(already)
    assert [type(m) for m in already] == [hnn.LinearReLU, nn.ReLU]


def test_fuse_inside_custom_module_and_with_handgrad_activations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), hnn.Sigmoid())

        def forward(self, x):
            return self.body(x)

    net = Net()
    reference = copy.deepcopy(net)
    hnn.fuse(net)
    x = torch.randn(2, 3)
    assert handgrad_ops(net, x) == ["linear_activation"]
    torch.testing.assert_close(net(x), reference(x))


def test_modules_survive_deepcopy_pickle_and_state_dict_round_trip():
    model = hnn.fuse(make_model())
    x = torch.randn(3, 8)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(copy.deepcopy(model)(x), model(x))
    fresh = hnn.fuse(make_model())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


def test_the_package_imports_have_no_circle():
    # Every import between handgrad's own modules (at any depth of the file), as a graph:
    # a circle works only by import order, and breaks when that order changes.
    import ast
    import pathlib

    import handgrad

    package = pathlib.Path(handgrad.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        edges = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                edges.update(t.split(".")[0] for t in targets if (package / f"{t.split('.')[0]}.py").exists())
    assert {"nn", "_fuse", "_modules"} <= graph.keys() and "_modules" in graph["_fuse"]

    def circle_from(start, path):
        for target in graph.get(path[-1], ()):
            if target == start:
                return path + [start]
            if target not in path and (found := circle_from(start, path + [target])):
                return found
        return None

    for module in graph:
        assert circle_from(module, [module]) is None, " -> ".join(circle_from(module, [module]))


def test_the_modules_are_handgrad_nn_s_for_repr_and_pickle():
    assert hnn.LinearReLU.__module__ == "handgrad.nn" and hnn.MLP.__module__ == "handgrad.nn"
    model = hnn.MLP([3, 4, 2])
    restored = torch.load(io.BytesIO(_saved(model)), weights_only=False)
    assert type(restored) is hnn.MLP
    torch.testing.assert_close(restored(torch.ones(1, 3)), model(torch.ones(1, 3)))


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()
