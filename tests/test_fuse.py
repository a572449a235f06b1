"""fuse() on models torch.fx can trace: activations called in forward, hooks respected,
state_dicts and parameters kept, and a clear report of what was fused and why."""

import collections
import contextlib
import copy
import inspect
import logging
import random
import threading
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import handgrad.functional as hf
import handgrad._fuse as hnn_fuse
import handgrad.nn as hnn
from samples import handgrad_ops


class FunctionalNet(nn.Module):
    """Activations as calls in forward, every way people write them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 12)
        self.fc4, self.fc5, self.fc6 = nn.Linear(12, 10), nn.Linear(10, 10), nn.Linear(10, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.head = nn.Linear(6, 3)
        self.slope = 0.3

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.sigmoid(self.fc2(h))
        h = F.leaky_relu(self.fc3(h), negative_slope=self.slope)
        h = self.fc4(h).relu()
        h = self.act(self.fc5(h))
        h = hf.relu(self.fc6(h), inplace=True)
        return self.head(self.block(h))


EXPECTED = {"fc1": hnn.LinearReLU, "fc2": hnn.LinearSigmoid, "fc3": hnn.LinearLeakyReLU,
            "fc4": hnn.LinearReLU, "fc5": hnn.LinearLeakyReLU, "fc6": hnn.LinearReLU,
            "block.0": hnn.LinearReLU, "head": nn.Linear}


def outputs_and_grads(model, x):
    out = model(x)
    return (out, *torch.autograd.grad(out.square().sum(), [x, *model.parameters()]))


def test_fuses_activations_called_in_forward():
    torch.manual_seed(0)
    model = FunctionalNet()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    fused = hnn.fuse(model)
    assert fused is model and type(fused) is FunctionalNet  # the user's own object
    decisions = {d.name: d for d in hnn.fusion_decisions(reference)}
    for name, kind in EXPECTED.items():
        assert decisions[name].fused == (kind is not nn.Linear), name
    # The modules stay as they are, those of nn.Sequential included: the forward runs the
    # pairs fused.
    assert [type(m) for m in fused.modules()] == [type(m) for m in reference.modules()]
    assert handgrad_ops(fused, torch.randn(2, 8)).count("linear_activation") == 7
    assert all(a is b for a, b in zip(fused.parameters(), parameters))  # optimizers keep working
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = torch.randn(5, 8, requires_grad=True)
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(reference, x)):
        torch.testing.assert_close(a, b)
    # Checkpoints load both ways.
    reference.load_state_dict(fused.state_dict())
    fresh = hnn.fuse(FunctionalNet())
    fresh.load_state_dict(reference.state_dict())
    torch.testing.assert_close(fresh(x), reference(x))


class OptionalArguments(nn.Module):
    """forward's optional arguments as real models take them: a mask that may be None, a flag
    and a mode, each choosing a branch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, mask=None, return_features: bool = False, *, mode: str = "sum"):
        h = F.relu(self.fc1(x))
        if mask is None:
            h = h + 1
        else:
            h = h * mask
        h = torch.sigmoid(self.fc2(h))
        if return_features:
            return h
        return self.head(h) if mode == "sum" else -self.head(h)


@pytest.mark.parametrize("example", [False, True])
def test_arguments_that_choose_a_branch_take_it_in_every_call(example):
    # torch.fx traces each argument as a proxy, and `proxy is None` is False: a program
    # traced so takes the mask's branch in every call. Each call's None, bool and str
    # arguments pick a program traced with their values.
    torch.manual_seed(0)
    model = OptionalArguments()
    x, mask = torch.randn(5, 4), torch.rand(5, 8)
    fused = hnn.fuse(copy.deepcopy(model), example_inputs=(x,) if example else None)
    calls = [((x,), {}), ((x, mask), {}), ((x, None, True), {}), ((x,), {"mask": mask, "return_features": True}),
             ((x,), {"mode": "negate"}), ((x, None, False), {"mode": "negate"}), ((x,), {"mask": None, "mode": "negate"}), ((x,), {})]
    for args, kwargs in calls:
        assert handgrad_ops(fused, *args, **kwargs) == ["linear_activation"] * 2, (args, kwargs)
        out, expected = fused(*args, **kwargs), model(*args, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        grads = torch.autograd.grad(out.sum(), list(fused.parameters()), allow_unused=True)
        expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()), allow_unused=True)
        torch.testing.assert_close(grads, expected_grads)
    # One program per training mode and set of values, kept: fuse()'s two (training and
    # eval, no mask, no flag, "sum") and the four other sets the calls in training mode gave.
    assert len(fused.forward.programs) == 6


class ResidualSequential(nn.Sequential):
    """A Sequential subclass with a forward of its own that does not run its modules in order."""

    def forward(self, x):
        h = self[0](x)
        return self[1](h) + h


class LoopSequential(nn.Sequential):
    """A Sequential subclass whose own forward does run its modules in order."""

    def forward(self, x):
        for module in self:
            x = module(x)
        return x


def test_sequential_subclasses_with_a_forward_of_their_own_are_fused_as_their_forward_calls():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    residual = ResidualSequential(nn.Linear(4, 4), nn.ReLU())
    fused = hnn.fuse(copy.deepcopy(residual))
    # The Linear's output is used twice: nothing fuses, and the result is the model's.
    assert type(fused[0]) is nn.Linear and type(fused[1]) is nn.ReLU
    assert handgrad_ops(fused, x) == []
    torch.testing.assert_close(fused(x), residual(x), rtol=0, atol=0)
    loop = nn.Sequential(nn.Linear(4, 6), LoopSequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)))
    fused = hnn.fuse(copy.deepcopy(loop))
    assert type(fused[1][0]) is nn.Linear  # fused in the traced forward, not in place
    assert handgrad_ops(fused, x) == ["linear_activation"]
    torch.testing.assert_close(fused(x), loop(x))


class SharedLinear(nn.Module):
    """One Linear in an nn.Sequential before a sigmoid and, shared, called alone."""

    def __init__(self):
        super().__init__()
        linear = nn.Linear(4, 4)
        self.net = nn.Sequential(linear, nn.Sigmoid())
        self.projection = linear

    def forward(self, x):
        return self.net(x) + self.projection(x)


class SharedSequential(nn.Module):
    """One nn.Sequential called twice: its Linear is always followed by its ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        return self.net(self.net(x))


def test_a_linear_registered_in_two_places_fuses_where_its_sequential_runs_it():
    # The Linear itself stays as it is: called alone, it gives its own output; its
    # nn.Sequential runs it with the sigmoid after it.
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    model = SharedLinear()
    fused = hnn.fuse(copy.deepcopy(model))
    assert type(fused.net[0]) is nn.Linear and fused.net[0] is fused.projection
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(fused.projection(x), model.projection(x), rtol=0, atol=0)
    assert handgrad_ops(fused, x) == ["linear_activation"]
    assert hnn.fusion_decisions(model) == [hnn.FusionDecision("net.0", True, "fused with the sigmoid after it")]
    # A container used twice: fused at each call, and reported once.
    model = SharedSequential()
    assert hnn.fusion_decisions(model) == [hnn.FusionDecision("net.0", True, "fused with the relu after it")]
    fused = hnn.fuse(copy.deepcopy(model))
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2
    torch.testing.assert_close(fused(x), model(x))


def test_a_linear_held_twice_by_one_sequential_fuses_with_the_activation_after_each_place():
    # Weight tying by module reuse: the second place is followed by another activation.
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), shared, nn.Tanh(), shared, nn.Sigmoid(), nn.Linear(6, 2))
    x = torch.randn(3, 4, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))
    assert [type(m) for m in fused] == [type(m) for m in model] and fused[2] is fused[4]
    # (the last pair and the output layer as MLP's op)
    assert handgrad_ops(fused, x) == ["linear_activation", "linear_activation", "mlp_forward"]
    y, expected = fused(x), model(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x), torch.autograd.grad(expected.sum(), x))


class CallsItsLinearAlone(nn.Module):
    """forward calls a Linear of its nn.Sequential apart from the activation after it."""

    def __init__(self, runs_members=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Sigmoid())
        self.runs_members = runs_members

    def forward(self, x):
        if self.runs_members:  # the members one by one, the first Linear's output kept
            features = self.net[0](x)
            return self.net[3](self.net[2](self.net[1](features))) + features
        return self.net(x) + self.net[0](x)


@pytest.mark.parametrize("runs_members", [False, True])
def test_a_sequential_linear_that_forward_calls_alone_is_plain_there(runs_members):
    # forward also calls net.0 apart from its ReLU: that call is the plain Linear's, and the
    # container (or the program, for the members run one by one) fuses the pairs it runs.
    torch.manual_seed(0)
    model, x = CallsItsLinearAlone(runs_members), torch.randn(3, 4, requires_grad=True)
    decided = {d.name: d.fused for d in hnn.fusion_decisions(model)}
    assert decided == {"net.0": True, "net.2": True}
    fused = hnn.fuse(copy.deepcopy(model))
    assert [type(m) for m in fused.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert handgrad_ops(fused, x) == ["linear_activation"] * (1 if runs_members else 2)
    y, expected = fused(x), model(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x), torch.autograd.grad(expected.sum(), x))


class CallsANamedMember(nn.Module):
    """An nn.Sequential of named modules, whose Linear forward also calls by its name."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(collections.OrderedDict(fc1=nn.Linear(4, 4), act=nn.ReLU(),
                                                         fc2=nn.Linear(4, 4), gate=nn.Sigmoid()))

    def forward(self, x):
        return self.net(x) + self.net.fc1(x)


def test_a_named_sequential_member_called_alone_runs_apart_and_decisions_use_its_name():
    torch.manual_seed(0)
    model, x = CallsANamedMember(), torch.randn(3, 4)
    assert {d.name: d.fused for d in hnn.fusion_decisions(model)} == {"net.fc1": True, "net.fc2": True}
    fused = hnn.fuse(copy.deepcopy(model))
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2  # the container's; net.fc1(x) is plain
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


class UsesItsMembersElsewhere(nn.Module):
    """Code that uses an nn.Sequential's members apart from the container's own forward,
    where no trace of forward can see it: another method, the members run one by one to keep
    the pre-activations (as the chapter's backward pass needs them), slices, .forward."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 2))
        self.untraceable = untraceable

    def forward(self, x):
        if self.untraceable and x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            return self.net(x) + self.net[0](x).sum()
        return self.net(x)

    def pre_activations(self, x):
        stored = []
        for module in self.net:
            x = module(x)
            stored.append(x)
        return stored

    def first_layer(self, x):
        return self.net[0](x), self.net[0].forward(x), self.net[:1](x), self.net[1:](self.net[:1](x))


@pytest.mark.parametrize("untraceable", [False, True])
def test_members_of_a_fused_sequential_used_elsewhere_compute_what_they_did(untraceable):
    torch.manual_seed(0)
    model, x = UsesItsMembersElsewhere(untraceable), torch.rand(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable forward's
        fused = hnn.fuse(copy.deepcopy(model))
        torch.testing.assert_close(fused(x), model(x))  # (traced at its first call)
    assert handgrad_ops(fused.net, x) == ["linear_activation", "mlp_forward"]  # the container runs them fused
    for got, want in zip([*fused.pre_activations(x), *fused.first_layer(x)],
                         [*model.pre_activations(x), *model.first_layer(x)]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_fused_sequential_follows_changes_to_its_members():
    # Each call runs a pair as it stands: a hook registered since, a slope changed, an
    # activation or a member replaced or wrapped (activation checkpointing) are seen at the
    # next call.
    torch.manual_seed(0)
    # (nn.Identity keeps the second pair and the output layer from running as MLP's op)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.ReLU(), nn.Identity(),
                             nn.Linear(8, 2)), torch.randn(3, 4)
    reference = copy.deepcopy(model)
    fused = hnn.fuse(copy.deepcopy(model))
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2
    seen = []
    handle = fused[0].register_forward_hook(lambda module, args, out: seen.append(out))
    assert handgrad_ops(fused, x) == ["linear_activation"]
    torch.testing.assert_close(seen[-1], reference[0](x), rtol=0, atol=0)  # its own output
    handle.remove()
    fused[1].negative_slope = reference[1].negative_slope = 0.3
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2
    torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)
    fused[3] = nn.Tanh()
    reference[3] = nn.Tanh()
    torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2  # now with the Tanh
    fused[2] = nn.Sequential(fused[2])  # a wrapper, as activation checkpointing puts one
    torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)


def test_a_sequential_reports_every_linear():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ELU(), nn.Linear(4, 2))
    assert hnn.fusion_decisions(model) == [hnn.FusionDecision("0", True, "fused with the relu after it"),
                                           hnn.FusionDecision("2", False, "ELU follows it"),
                                           hnn.FusionDecision("4", False, "nothing follows it")]


def _figure_7_8(**linear):
    return nn.Sequential(nn.Linear(10, 40, **linear), nn.ReLU(), nn.Linear(40, 40, **linear), nn.ReLU(),
                         nn.Linear(40, 5, **linear))


def test_a_run_of_pairs_in_a_sequential_runs_as_mlps_one_op():
    # Figure 7.8 as a learner writes it: the whole network in one op (handgrad.nn.MLP's),
    # torch.nn's outputs and gradients, first and second order.
    torch.manual_seed(0)
    model = _figure_7_8(dtype=torch.float64)
    x = torch.randn(10, 10, dtype=torch.float64, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))
    assert handgrad_ops(fused, x) == ["mlp_forward"]
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(fused, (x,)) and torch.autograd.gradgradcheck(fused, (x,))
    # The pairs of the last activation (here Tanh) end the network: the output activation.
    tanh = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh()).double()
    assert handgrad_ops(hnn.fuse(copy.deepcopy(tanh)), x) == ["mlp_forward"]
    torch.testing.assert_close(hnn.fuse(copy.deepcopy(tanh))(x), tanh(x))


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_a_run_of_pairs_follows_changes_made_after_it_ran():
    # The container keeps its plan (the run as MLP's op) from call to call; whatever the op
    # depends on, changed after a call, is seen at the next one, and the results are eager's.
    torch.manual_seed(0)
    model, x = _figure_7_8(), torch.randn(10, 10, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))

    def check(ops):
        assert handgrad_ops(fused, x) == ops
        for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x)):
            torch.testing.assert_close(a, b)

    check(["mlp_forward"])
    seen = []
    handle = fused[4].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    check(["mlp_forward"])  # the hidden pairs only, with the output activation; then the Linear
    assert len(seen) == 2  # the hook fired at each of check's two calls
    handle.remove()
    check(["mlp_forward"])
    assert len(seen) == 2
    for m in (fused, model):  # a new Parameter put in place is the one the op reads
        torch.manual_seed(1)
        m[0].weight = nn.Parameter(torch.randn(40, 10))
    check(["mlp_forward"])
    for m in (fused, model):  # a member replaced by one of the same kind
        torch.manual_seed(3)
        m[4] = nn.Linear(40, 5)
    check(["mlp_forward"])
    fused[2].bias = model[2].bias = None  # biases no longer all present: pair by pair
    check(["linear_activation"] * 2)
    for m in (fused, model):
        torch.manual_seed(2)
        m[2].bias = nn.Parameter(torch.randn(40))
    check(["mlp_forward"])
    for m in (fused, model):  # its class changes: the pair runs on its own, reading the property
        torch.nn.utils.parametrize.register_parametrization(m[2], "weight", _Doubled())
    check(["linear_activation"] * 2)
    fused[1] = model[1] = nn.LeakyReLU(0.2)  # another activation after the first Linear
    check(["linear_activation"] * 2)


def test_a_sequential_that_a_traced_forward_calls_runs_its_own_fused_forward():
    # A model that wraps its network in an nn.Sequential (`self.layers(x)`): its program calls
    # the container, whose forward runs the network as MLP's one op; its other calls fuse
    # as calls.
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers, self.head = _figure_7_8(), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.layers(x) * 2))

    torch.manual_seed(0)
    model, x = Wrapped(), torch.randn(10, 10, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))
    assert handgrad_ops(fused, x) == ["mlp_forward"]
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change", ["pre-hook", "bias on some layers", "parametrized weight", "in-place after it"])
def test_a_run_of_pairs_runs_pair_by_pair_where_mlps_op_cannot_stand_for_it(change):
    torch.manual_seed(0)
    model = _figure_7_8()
    if change == "pre-hook":  # torch.nn.utils.weight_norm's kind: it may change the input
        model[2].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    elif change == "bias on some layers":
        model[2] = nn.Linear(40, 40, bias=False)
    elif change == "parametrized weight":
        torch.nn.utils.parametrizations.weight_norm(model[2])
    else:
        model.append(nn.Dropout(0.0, inplace=True))
    x = torch.randn(10, 10, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))
    ops = handgrad_ops(fused, x)
    assert "mlp_forward" not in ops and ops.count("linear_activation") == 2
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x)):
        torch.testing.assert_close(a, b)


def test_data_parallel_replicas_of_a_fused_sequential_run_their_own_parameters():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Sigmoid()), torch.randn(3, 4)
    fused = hnn.fuse(copy.deepcopy(model))
    for fused_replica, replica in zip(_replicas(fused, [2.0, 3.0]), _replicas(model, [2.0, 3.0])):
        assert fused_replica.forward.model is fused_replica
        assert handgrad_ops(fused_replica, x) == ["linear_activation"] * 2
        torch.testing.assert_close(fused_replica(x), replica(x), rtol=0, atol=0)


class Tempered(nn.Module):
    """forward reads plain attributes that training code changes: a temperature, a flag."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.temperature, self.use_head, self.scales = 1.0, True, [1.0]

    def forward(self, x):
        h = F.relu(self.fc(x))
        for scale in self.scales:
            h = h * scale
        return self.head(h) / self.temperature if self.use_head else h


def test_a_changed_attribute_that_forward_reads_traces_it_again():
    # torch.fx takes self.temperature into the program as the value it had at the trace.
    torch.manual_seed(0)
    model, x = Tempered(), torch.randn(3, 4)
    fused = hnn.fuse(copy.deepcopy(model))
    for temperature, use_head, scale in [(1.0, True, None), (2.0, True, None), (2.0, False, None), (1, True, None),
                                         (1, True, 3.0)]:
        for m in (model, fused):
            m.temperature, m.use_head = temperature, use_head
            if scale is not None:
                m.scales.append(scale)  # changed in place
        assert handgrad_ops(fused, x) == ["linear_activation"]
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert "__getattribute__" not in nn.Module.__dict__  # the recording is gone after each trace
    # An attribute that changes at every call: traced again up to a limit, then unfused, with
    # one warning; the results stay the model's.
    with pytest.warns(UserWarning, match=r"attributes its forward reads \(scales, temperature, use_head\)"):
        for step in range(30):
            model.temperature = fused.temperature = 1.0 + step / 10
            torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert handgrad_ops(fused, x) == []


class DtypeAndDevice(nn.Module):
    """Properties read off the parameters, as Hugging Face models and diffusers have them."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(10, 2)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, x):
        h = F.relu(self.fc(x.to(self.dtype)))
        padding = torch.zeros(x.shape[0], 2, dtype=self.dtype, device=self.device)
        return self.head(torch.cat([h, padding], 1))


def test_a_property_that_forward_reads_is_read_again_after_the_model_moves():
    # torch.fx takes self.dtype into the program as the value it had at the trace: after
    # model.double(), the program cast the input to float32 and raised.
    torch.manual_seed(0)
    model, x = DtypeAndDevice(), torch.randn(3, 4)
    fused = hnn.fuse(copy.deepcopy(model))
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    for dtype in (torch.float64, torch.bfloat16, torch.float32):
        model.to(dtype), fused.to(dtype)
        out = fused(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        assert handgrad_ops(fused, x) == ["linear_activation"]


class KLEncoder(nn.Module):
    """A VAE's encoder as tutorials write it: forward keeps its KL term as an attribute."""

    def __init__(self):
        super().__init__()
        self.hidden, self.mu, self.log_sigma = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.hidden(x))
        mu, sigma = self.mu(h), torch.exp(self.log_sigma(h))
        self.kl = (sigma**2 + mu**2 - torch.log(sigma) - 1 / 2).sum()
        return mu + sigma


class KLAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = KLEncoder(), nn.Linear(2, 4)

    def forward(self, x):
        return torch.sigmoid(self.decoder(self.encoder(x)))


def test_a_forward_that_sets_attributes_is_left_unfused_and_keeps_setting_them():
    # torch.fx's program has no setattr: fused, encoder.kl would stay the trace's proxy.
    torch.manual_seed(0)
    model, x = KLAutoencoder(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"KLAutoencoder's forward sets KLEncoder.kl, which a traced program would not"):
        fused = hnn.fuse(copy.deepcopy(model))
    assert "kl" not in vars(fused.encoder)  # the trace's write undone
    with pytest.warns(UserWarning, match="sets KLEncoder.kl"):  # as fuse() warns
        decisions = hnn.fusion_decisions(model)
    assert decisions and all(not d.fused and "sets KLEncoder.kl" in d.reason for d in decisions)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert isinstance(fused.encoder.kl, torch.Tensor)
    torch.testing.assert_close(fused.encoder.kl, model.encoder.kl, rtol=0, atol=0)
    # The recording's own __setattr__ and __getattribute__ are gone.
    assert nn.Module.__setattr__.__qualname__ == "Module.__setattr__" and "__getattribute__" not in nn.Module.__dict__


class Distilled(nn.Module):
    """A student with its teacher inside forward, run without gradients, as distillation and
    momentum-encoder code (MoCo, BYOL) writes it; and a layer kept in float32 under autocast."""

    def __init__(self):
        super().__init__()
        self.student, self.teacher, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            target = F.relu(self.teacher(x))
        h = torch.sigmoid(self.student(x)) * target.norm()
        with torch.autocast("cpu", enabled=False):
            return torch.relu(self.head(h.float()))


class Float32Head(nn.Module):
    """A head kept in float32 under autocast, as mixed-precision models keep their last layer."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.body(x))
        with torch.autocast("cpu", enabled=False):
            return torch.sigmoid(self.head(h.float()))


@pytest.mark.parametrize("model_class", [Distilled, Float32Head])
def test_a_forward_that_switches_grad_or_autocast_mode_inside_is_left_unfused(model_class):
    # torch.fx records no mode: the program ran the teacher with gradients (it got .grad, and
    # the student's gradient changed through target.norm()).
    # autocast(enabled=False) changes nothing where fuse() traces, outside autocast, but the
    # program would run the head in bfloat16 under the caller's autocast.
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match="runs part of itself in another grad or autocast mode"):
        fused = hnn.fuse(copy.deepcopy(model))
    for m in (model, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            out.sum().backward()
        assert out.dtype == torch.float32
    for a, b in zip(fused.parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None)  # the teacher has none
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert not hasattr(torch.no_grad.__enter__, "__wrapped__")  # torch's own again


class TwoLayers(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 8), nn.Linear(8, width)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class KLOnTheRoot(nn.Module):
    """A VAE that keeps its KL term on itself; its encoder and decoder are plain."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = TwoLayers(), TwoLayers()

    def forward(self, x):
        h = self.encoder(x)
        self.kl = h.square().mean()
        return self.decoder(h)


class MomentumEncoder(nn.Module):
    """MoCo and BYOL: a key encoder run without gradients, in a list of encoders."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([TwoLayers(), TwoLayers()])

    def forward(self, x):
        query = self.encoders[0](x)
        with torch.no_grad():
            key = self.encoders[1](x)
        return (query * key).sum(1)


@pytest.mark.parametrize("model_class", [KLOnTheRoot, MomentumEncoder])
def test_a_model_whose_forward_cannot_be_fused_fuses_its_submodules_on_their_own(model_class):
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match="calls of its submodules that have a forward of their own"):
        fused = hnn.fuse(copy.deepcopy(model))
    decisions = {d.name: d.fused for d in hnn.fusion_decisions(fused)}
    assert sorted(name for name, is_fused in decisions.items() if is_fused) == (
        ["decoder.fc1", "encoder.fc1"] if model_class is KLOnTheRoot else ["encoders.0.fc1", "encoders.1.fc1"])
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2
    x.requires_grad_()
    for m in (model, fused):
        m(x).square().sum().backward()
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-6)
    for a, b in zip(model.parameters(), fused.parameters()):
        assert (a.grad is None) == (b.grad is None)  # the key encoder has none
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6)
    if model_class is KLOnTheRoot:
        torch.testing.assert_close(fused.kl, model.kl)


class TanhBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CheckpointedBlocks(nn.Module):
    """Activation checkpointing (or offloading) in forward, as memory-bound training code
    writes it."""

    def __init__(self, saving):
        super().__init__()
        self.block = TanhBlock()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self.saving = saving

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.saving == "offloaded":
            with torch.autograd.graph.save_on_cpu():
                h = self.block(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.saving == "reentrant")
        return self.out(F.relu(h))


def outputs_and_accumulated_grads(model, x):
    """As outputs_and_grads, through backward() (reentrant checkpointing refuses .grad())."""
    x = x.detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return (out, x.grad, *(p.grad for p in model.parameters()))


@pytest.mark.parametrize("saving", ["checkpointed", "reentrant", "offloaded"])
def test_activation_checkpointing_in_forward_is_kept_and_the_checkpointed_block_fuses(saving):
    # torch.fx traces through checkpoint(): the program ran the block once and kept its
    # activations, the memory the user checkpointed to free. The model's own calls stay
    # unfused; the block, fused on its own, fuses inside the checkpoint.
    torch.manual_seed(0)
    model, x = CheckpointedBlocks(saving), torch.randn(4, 8)
    fused = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="another grad or autocast mode" if saving == "reentrant" else
                      r"saved-tensor hooks \(activation checkpointing with torch.utils.checkpoint"):
        hnn.fuse(fused)
    decisions = {d.name: d.fused for d in hnn.fusion_decisions(model)}
    assert decisions == {"fc": False, "block.fc1": True, "block.fc2": False, "out": False}
    runs = {}
    for name, m in (("model", model), ("fused", fused)):
        m.block.register_forward_pre_hook(lambda module, args, name=name: runs.update({name: runs.get(name, 0) + 1}))
    assert handgrad_ops(fused, x) == ["linear_activation"]
    runs.clear()
    for a, b in zip(outputs_and_accumulated_grads(model, x), outputs_and_accumulated_grads(fused, x)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # forward, and again in backward where checkpointed
    assert runs == {"model": 1 + (saving != "offloaded"), "fused": 1 + (saving != "offloaded")}


class WithMLP(nn.Module):
    """A model that uses handgrad.nn.MLP for part of itself."""

    def __init__(self):
        super().__init__()
        self.pre, self.mlp = nn.Linear(4, 6), hnn.MLP([6, 8, 2])

    def forward(self, x):
        return self.mlp(F.relu(self.pre(x)))


def test_a_model_holding_an_mlp_fuses_around_it():
    # torch.fx keeps MLP whole, as it keeps torch.nn's modules (its op cannot take a proxy).
    torch.manual_seed(0)
    model, x = WithMLP(), torch.randn(3, 4, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))
    assert hnn.fusion_decisions(model) == [hnn.FusionDecision("pre", True, "fused with the relu after it")]
    assert handgrad_ops(fused, x.detach()) == ["linear_activation", "mlp_forward"]
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x)):
        torch.testing.assert_close(a, b)


class WithFusedChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.fc = Tempered(), nn.Linear(2, 4)

    def forward(self, x, mask=None):
        h = torch.tanh(self.fc(self.inner(x)))
        return h if mask is None else h * mask


def test_a_model_whose_submodule_was_fused_on_its_own_fuses_and_traces_through_it():
    # The parent's trace runs the child's fused forward, which traces a call of its own there.
    torch.manual_seed(0)
    model, x, mask = WithFusedChild(), torch.randn(3, 4), torch.rand(3, 4)
    fused = copy.deepcopy(model)
    hnn.fuse(fused.inner)
    fused.inner.temperature = model.inner.temperature = 3.0
    hnn.fuse(fused)
    assert handgrad_ops(fused, x, mask) == ["linear_activation"] * 2
    torch.testing.assert_close(fused(x, mask), model(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert nn.Module.__setattr__.__qualname__ == "Module.__setattr__" and "__getattribute__" not in nn.Module.__dict__


def test_traces_at_call_time_leave_other_threads_modules_alone():
    # torch.fx patches nn.Module.__call__ for every thread while it traces: another thread's
    # module call then went through the tracer ("module is not installed as a submodule").
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    pairs = [(Tempered(),) * 2 for _ in range(4)]
    pairs = [(model, hnn.fuse(copy.deepcopy(model))) for model, _ in pairs]
    results = []

    def run(model, fused):
        for step in range(12):  # a new temperature at every call: each call traces again
            model.temperature = fused.temperature = 1.0 + step
            results.append(torch.equal(fused(x), model(x)))

    threads = [threading.Thread(target=run, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 48
    assert "__getattribute__" not in nn.Module.__dict__


def test_a_fused_model_exports_with_its_forwards_signature():
    # torch.export reads forward.__code__ and binds the arguments by forward's signature.
    torch.manual_seed(0)
    model = OptionalArguments()
    fused = hnn.fuse(copy.deepcopy(model))
    assert inspect.signature(fused.forward) == inspect.signature(model.forward)
    x, mask = torch.randn(5, 4), torch.rand(5, 8)
    program = torch.export.export(fused, (x,))
    called = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert called.count(torch.ops.handgrad.linear_activation.default) == 2
    torch.testing.assert_close(program.module()(x), model(x))
    # A call fuse() has not traced (a mask given) exports the model's own forward.
    torch.testing.assert_close(torch.export.export(fused, (x, mask)).module()(x, mask), model(x, mask))


def _replicas(model, scales):
    """What nn.DataParallel's replicate() makes of model, one replica per scale, on the CPU:
    each module's _replicate_for_data_parallel(), its children set to their replicas and its
    parameters to copies (here scaled, to tell the replicas apart)."""
    modules = list(model.modules())
    copies = [[module._replicate_for_data_parallel() for module in modules] for _ in scales]
    for i, module in enumerate(modules):
        for replica, scale in zip((c[i] for c in copies), scales):
            for key, child in module._modules.items():
                setattr(replica, key, copies[scales.index(scale)][modules.index(child)])
            for key, parameter in module._parameters.items():
                setattr(replica, key, parameter.detach() * scale)
    return [c[0] for c in copies]


def test_data_parallel_replicas_run_their_own_parameters():
    # A replica copies the model's __dict__, fused forward included: that forward ran the
    # original model, not the replica and its parameters on its device.
    torch.manual_seed(0)
    model, x = Tempered(), torch.randn(3, 4)
    fused = hnn.fuse(copy.deepcopy(model))
    fused(x)
    for fused_replica, replica in zip(_replicas(fused, [2.0, 3.0]), _replicas(model, [2.0, 3.0])):
        assert fused_replica.forward.model is fused_replica
        assert fused_replica.forward.programs is fused.forward.programs  # traced once, shared
        assert handgrad_ops(fused_replica, x) == ["linear_activation"]
        torch.testing.assert_close(fused_replica(x), replica(x), rtol=0, atol=0)


def test_fused_model_compiles():
    torch._dynamo.reset()
    fused = hnn.fuse(FunctionalNet())
    x = torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(fused, fullgraph=True)(x), fused(x))


def test_a_fused_sequential_compiles_and_exports_its_fused_ops():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.LeakyReLU(0.1), nn.Linear(40, 5))
    fused, x = hnn.fuse(copy.deepcopy(model)), torch.randn(10, 10)
    torch.testing.assert_close(torch.compile(fused, fullgraph=True)(x), model(x))
    called = [node.target for node in torch.export.export(fused, (x,)).graph.nodes if node.op == "call_function"]
    assert called == [torch.ops.handgrad.linear_activation.default, torch.ops.handgrad.mlp.default]


def test_hooked_modules_are_left_unfused_and_their_hooks_fire(capsys):
    model = FunctionalNet()
    reference = copy.deepcopy(model)
    seen = []
    model.fc1.register_forward_hook(lambda module, args, out: seen.append(out.min().item()))
    model.act.register_forward_pre_hook(lambda module, args: None)
    fused = hnn.fuse(model, verbose=True)
    printed = capsys.readouterr().out
    assert "fc1: not fused, it has a forward hook, which must keep seeing its own output" in printed
    assert "fc5: not fused, its activation module has hooks" in printed
    assert "fc2: fused, fused with the sigmoid after it" in printed
    x = torch.randn(5, 8)
    torch.testing.assert_close(fused(x), reference(x))
    assert seen and seen[-1] < 0  # the hook saw the Linear's own output, before its ReLU


class LowRankAdapted(nn.Module):
    """A LoRA-style wrapper put in a Linear's place, as adapter libraries do."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base
        self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class TwoActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.out(F.relu(self.fc2(self.act(self.fc1(x)))))


CHANGES_AFTER_FUSING = {
    "forward hook on a fused Linear": lambda m, seen: m.fc2.register_forward_hook(
        lambda module, args, out: seen.append(out.min().item())),
    "forward hook that changes the output": lambda m, seen: m.fc1.register_forward_hook(
        lambda module, args, out: out * 2),
    "full backward hook": lambda m, seen: m.fc1.register_full_backward_hook(
        lambda module, grad_input, grad_output: seen.append(grad_output[0].abs().sum().item())),
    "hook on the activation module": lambda m, seen: m.act.register_forward_hook(lambda module, args, out: out + 1),
    "activation's slope": lambda m, seen: setattr(m.act, "negative_slope", 0.3),
    "activation replaced": lambda m, seen: setattr(m, "act", nn.Tanh()),
    "Linear wrapped by an adapter": lambda m, seen: setattr(m, "fc1", LowRankAdapted(m.fc1)),
    "Linear replaced by a container": lambda m, seen: setattr(m, "fc2", nn.Sequential(nn.Linear(16, 16))),
}


@pytest.mark.parametrize("change", CHANGES_AFTER_FUSING)
def test_hooks_and_modules_changed_after_fusing_are_respected(change):
    # The trace decided on the modules as they were; the program calls neither module of a
    # fused pair, so it would skip a hook registered since, or run the old module.
    torch.manual_seed(0)
    model, x = TwoActivations(), torch.randn(5, 8, requires_grad=True)
    fused = hnn.fuse(copy.deepcopy(model))
    fused(x)  # the programs are traced and run once before the change
    seen, seen_fused = [], []
    for m, log in ((model, seen), (fused, seen_fused)):
        torch.manual_seed(1)  # the same initial values for a new module
        CHANGES_AFTER_FUSING[change](m, log)
    for a, b in zip(outputs_and_grads(model, x), outputs_and_grads(fused, x)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert seen_fused == pytest.approx(seen)


def test_hooks_and_attributes_that_come_and_go_reuse_the_programs_traced_for_them():
    # Evaluation code registers a hook for features and removes it; a flag flips between two
    # values. Each state's program is kept, so flipping back traces nothing and never reaches
    # the limit that leaves the model unfused.
    torch.manual_seed(0)
    model, x = TwoActivations(), torch.randn(5, 8)
    fused = hnn.fuse(copy.deepcopy(model))
    traces = []
    original = hnn_fuse._trace
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that the programs keep going stale
        try:
            hnn_fuse._trace = lambda *args: traces.append(1) or original(*args)
            for step in range(2 * hnn_fuse._MAX_RETRACES + 2):
                features = []
                handle = fused.fc2.register_forward_hook(lambda module, args, out: features.append(out)) \
                    if step % 2 else None
                torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-6)
                assert handgrad_ops(fused, x) == ["linear_activation"] * (1 if step % 2 else 2)
                assert len(features) == 2 * (step % 2)  # the hook saw both calls
                if handle is not None:
                    handle.remove()
        finally:
            hnn_fuse._trace = original
    assert len(traces) == 1  # with the hook; without it, the program fuse() traced
    tempered, reference = Tempered(), None
    reference = copy.deepcopy(tempered)
    hnn.fuse(tempered)
    traces.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            hnn_fuse._trace = lambda *args: traces.append(1) or original(*args)
            for step in range(2 * hnn_fuse._MAX_RETRACES + 2):
                tempered.use_head = reference.use_head = bool(step % 2)
                torch.testing.assert_close(tempered(x[:, :4]), reference(x[:, :4]), rtol=0, atol=0)
        finally:
            hnn_fuse._trace = original
    assert len(traces) == 1 and handgrad_ops(tempered, x[:, :4]) == ["linear_activation"]


def test_hooks_registered_for_every_module_see_every_module_of_a_fused_model():
    torch.manual_seed(0)
    model, x = TwoActivations(), torch.randn(5, 8)
    fused = hnn.fuse(copy.deepcopy(model))
    fused(x)
    called = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: called.append(type(module)))
    try:
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    finally:
        handle.remove()
    assert called[:len(called) // 2] == called[len(called) // 2:]
    assert called.count(nn.Linear) == 6
    assert handgrad_ops(fused, x) == ["linear_activation"] * 2  # fused again once it is removed


def test_report_says_what_was_fused_and_why_not(caplog, capsys):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h = torch.tanh(h) + h  # used twice
            return self.c(torch.sigmoid(self.b(h)))

    with caplog.at_level(logging.INFO, logger="handgrad.fuse"):
        fused = hnn.fuse(Net(), verbose=True)
    printed = capsys.readouterr().out
    assert "handgrad.nn.fuse: a: not fused, its output is used 2 times" in printed
    assert "handgrad.nn.fuse: b: fused, fused with the sigmoid after it" in printed
    assert "handgrad.nn.fuse: c: not fused, nothing follows it" in printed
    assert any("b: fused" in record.getMessage() for record in caplog.records)
    assert handgrad_ops(fused, torch.randn(3, 4)) == ["linear_activation"]


def test_untraceable_model_gets_the_sequential_pass_and_one_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Sigmoid())
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h = self.body(x)
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 2
            return F.relu(self.fc(h))

    model = Branchy()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it might branch on shapes only: known at its first call
        fused = hnn.fuse(model)
    assert fused is model
    x = torch.randn(3, 4)
    assert handgrad_ops(fused.body, x) == ["linear_activation"] * 2
    with pytest.warns(UserWarning, match="torch.fx cannot trace Branchy even for its inputs' shapes") as record:
        out = fused(x)
    assert len(record) == 1
    message = str(record[0].message)
    assert "test_fuse.py" in message and "if h.sum() > 0" in message
    torch.testing.assert_close(out, reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: later calls, new shapes included, run as they did
        for inputs in (x, torch.randn(5, 4)):
            torch.testing.assert_close(fused(inputs), reference(inputs))


class FlatFeatures(nn.Module):
    """PyTorch's tutorial network as it was long written: the flattened width counted from
    the size of an intermediate tensor, in a method; with batch norm and dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.BatchNorm1d(3 * 3 * 3)
        self.fc1, self.fc2, self.fc3 = nn.Linear(27, 16), nn.Linear(16, 8), nn.Linear(8, 2)

    def num_flat_features(self, x):
        count = 1
        for size in x.size()[1:]:
            count *= size
        return count

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = self.norm(x.view(-1, self.num_flat_features(x)))
        x = F.dropout(F.relu(self.fc1(x)), 0.5, training=self.training)
        return self.fc3(torch.sigmoid(self.fc2(x[:len(x)])))


def test_a_forward_that_reads_the_shapes_of_what_it_computes_is_traced_for_its_inputs_shapes():
    # torch.fx cannot iterate x.size() of an intermediate tensor; traced with the shapes of
    # the call's inputs, each op also runs on fake tensors, which know theirs.
    torch.manual_seed(0)
    model = FlatFeatures()
    fused = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hnn.fuse(fused)
        for rows in (4, 4, 7):
            x = torch.randn(rows, 1, 8, 8)
            torch.manual_seed(rows)
            expected = outputs_and_grads(model, x.requires_grad_())
            torch.manual_seed(rows)  # the trace, at the first call of a shape, draws nothing
            for a, b in zip(expected, outputs_and_grads(fused, x)):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            for name in ("running_mean", "running_var", "num_batches_tracked"):  # counted once a call
                torch.testing.assert_close(getattr(fused.norm, name), getattr(model.norm, name))
            assert handgrad_ops(fused, x) == ["linear_activation"] * 2
            assert handgrad_ops(model, x) == []  # its statistics counted as many times
    assert "fake" not in repr(vars(fused.norm)).lower()


class DataDependentWithEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.fc = TwoLayers(), nn.Linear(4, 4)

    def forward(self, x):
        h = self.encoder(x)
        if h.sum() > 0:  # data-dependent: found untraceable at the first call
            h = h * 2
        return F.relu(self.fc(h))


def test_a_model_found_untraceable_at_its_first_call_fuses_its_submodules_then():
    torch.manual_seed(0)
    model, x = DataDependentWithEncoder(), torch.randn(3, 4)
    fused = hnn.fuse(copy.deepcopy(model))
    with pytest.warns(UserWarning, match="cannot trace DataDependentWithEncoder even for its inputs' shapes"):
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)  # the first call runs unfused
    assert handgrad_ops(fused, x) == ["linear_activation"]  # the encoder's, fused on its own since
    for a, b in zip(outputs_and_grads(model, x.requires_grad_()), outputs_and_grads(fused, x)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_linear_subclasses_are_left_unfused_and_reported(capsys):
    class ScaledLinear(nn.Linear):  # a subclass may change forward: not ours to replace
        def forward(self, input):
            return 2 * super().forward(input)

    model = nn.Sequential(ScaledLinear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid())
    fused = hnn.fuse(model, verbose=True)
    assert [type(m) for m in fused] == [ScaledLinear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert handgrad_ops(fused, torch.randn(2, 3)) == ["linear_activation"]  # the second pair
    assert "0: not fused, ScaledLinear is not nn.Linear itself" in capsys.readouterr().out


def test_a_model_keeps_its_own_class_whether_or_not_anything_is_fused():
    # fuse() edits the model in place: its class (and so its methods) stay, never a
    # GraphModule in its stead.
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * 2

    head = Head()
    fused = hnn.fuse(head)
    assert type(fused) is Head and type(fused.fc) is nn.Linear  # nothing to fuse: left as it was
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fused = hnn.fuse(model)
    assert type(fused) is nn.Sequential and [type(m) for m in fused] == [nn.Linear, nn.ReLU, nn.Linear]
    assert handgrad_ops(fused, torch.randn(2, 3)) == ["mlp_forward"]


def test_train_and_eval_mode_are_kept():
    model = FunctionalNet().eval()
    fused = hnn.fuse(model)
    assert not fused.training and not fused.fc1.training


def test_silu_and_both_gelus_fuse_as_modules_and_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(approximate="tanh"), nn.Linear(7, 6), nn.SiLU(),
                          nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 2))
    x = torch.randn(3, 5)
    fused = hnn.fuse(model, inplace=False)
    assert handgrad_ops(fused, x) == ["linear_activation", "activation"] * 2 + ["mlp_forward"]
    torch.testing.assert_close(fused(x), model(x))  # each GELU as its approximate says

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c(torch.nn.functional.silu(self.b(torch.nn.functional.gelu(self.a(x), approximate="tanh"))))
    model = Calls()
    fused = hnn.fuse(model, inplace=False)
    assert [d.fused for d in hnn.fusion_decisions(fused)][:2] == [True, True]
    torch.testing.assert_close(fused(x), model(x))


def test_softplus_fuses_with_its_beta_and_threshold_as_modules_and_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Softplus(beta=100), nn.Linear(7, 6), nn.Softplus(2.0, 1.0),
                          nn.Linear(6, 2))
    x = torch.randn(9, 5)
    fused = hnn.fuse(model, inplace=False)
    assert handgrad_ops(fused, x) == ["linear_activation", "activation", "mlp_forward"]
    torch.testing.assert_close(fused(x), model(x))  # with each one's beta and threshold

    class Calls(nn.Module):  # F.softplus positionally and by name, and handgrad's
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            x = torch.nn.functional.softplus(self.a(x), 3.0, 2.0)
            x = torch.nn.functional.softplus(self.b(x), threshold=0.5)
            return self.d(hf.softplus(self.c(x), beta=5.0))
    model = Calls()
    fused = hnn.fuse(model, inplace=False)
    assert [d.fused for d in hnn.fusion_decisions(fused)] == [True, True, True, False]
    torch.testing.assert_close(fused(x), model(x))
    # A softplus whose beta is computed at run time is left as it is, with the reason.

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.nn.functional.softplus(self.a(x), x.abs().mean().item() + 1))
    decisions = hnn.fusion_decisions(hnn.fuse(Computed(), inplace=False))
    assert not decisions[0].fused and "beta is computed at run time" in decisions[0].reason


def test_fuse_is_handgrad_fuse_and_its_decisions_are_handgrad_nn_s():
    """`handgrad.fuse(model)` as users write it first (it was the module fuse.py, not
    callable), and the decisions pickle under the name users import them by."""
    import pickle

    import handgrad

    assert handgrad.fuse is hnn.fuse
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    fused = handgrad.fuse(model)
    x = torch.randn(5, 3)
    assert handgrad_ops(fused, x) == ["mlp_forward"]
    torch.testing.assert_close(fused(x), reference(x))
    decisions = hnn.fusion_decisions(fused)
    assert decisions and all(type(d) is hnn.FusionDecision for d in decisions)
    assert hnn.FusionDecision.__module__ == "handgrad.nn"
    assert pickle.loads(pickle.dumps(decisions)) == decisions


class ChangesAViewInPlace(nn.Module):
    """`v += 1` on a view of an activation's output, and `y *= 2` on an input: torch.fx traced
    them as v + 1 and y * 2, and the fused program left h and the caller's y unchanged."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x, y):
        h = F.relu(self.fc(x))
        v = h[:, :3]
        v += 1
        y *= 2
        return self.head(h) + y


def test_augmented_assignments_in_forward_change_what_they_change_in_eager():
    torch.manual_seed(0)
    model = ChangesAViewInPlace()
    reference = copy.deepcopy(model)
    fused = hnn.fuse(model)
    assert [d.fused for d in hnn.fusion_decisions(reference) if d.name == "fc"] == [True]
    x, y_fused, y_eager = torch.randn(5, 4), torch.ones(5, 2), torch.ones(5, 2)
    torch.testing.assert_close(fused(x, y_fused), reference(x, y_eager))
    torch.testing.assert_close(y_fused, y_eager)  # the caller's tensor, changed as eager changes it


class LeakyChangedInPlace(nn.Module):
    """A LeakyReLU output that forward changes in place afterwards, each way code does it.
    Eager's LeakyReLU saves its input, so its backward allows it; the fused layer saves its
    output, and its backward would fail ("modified by an inplace operation")."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 2)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.LeakyReLU(0.2))
        self.drop = nn.Dropout(0.25, inplace=True)

    def forward(self, x):
        if self.how == "sequential's output":
            h = self.block(x)
            h += x
            return self.head(h)
        h = F.leaky_relu(self.fc(x), 0.2)
        if self.how == "+=":
            h += x
        elif self.how == "method":
            h.mul_(0.5)
        elif self.how == "view":
            h.view(-1)[:3].add_(1)
        elif self.how == "F.dropout(inplace) by position":
            h = F.dropout(h, 0.25, self.training, True)
        elif self.how == "Dropout(inplace=True)":
            h = self.drop(h)
        return self.head(h)


@pytest.mark.parametrize("how", ["+=", "method", "view", "F.dropout(inplace) by position",
                                 "Dropout(inplace=True)", "sequential's output"])
def test_a_leaky_relu_output_changed_in_place_is_left_unfused_and_trains_as_in_eager(how):
    torch.manual_seed(0)
    model = LeakyChangedInPlace(how)
    reference = copy.deepcopy(model)
    name = "block.0" if how == "sequential's output" else "fc"
    for decisions in (hnn.fusion_decisions(model), hnn.fusion_decisions(hnn.fuse(model))):
        decision = [d for d in decisions if d.name == name]
        assert len(decision) <= 1 and all(not d.fused and "changed in place" in d.reason for d in decision)
    x = torch.randn(5, 6)
    for net in (model, reference):
        torch.manual_seed(1)  # the same dropout masks
        net(x).pow(2).sum().backward()
    for (key, fused), eager in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(fused.grad, eager.grad, msg=key)


class Untraceable(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else x  # data-dependent: torch.fx cannot trace it


@pytest.mark.parametrize("untraceable_parent", [False, True])
def test_a_sequential_leaky_relu_before_an_in_place_dropout_is_left_unfused(untraceable_parent):
    # Seen by the nn.Sequential pass itself where no trace of the model shows it.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.LeakyReLU(0.2), nn.Dropout(0.25, inplace=True), nn.Linear(6, 2))
    model = Untraceable(net) if untraceable_parent else net
    reference = copy.deepcopy(model)
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable parent's, at fuse() and its first call
        hnn.fuse(model)
        for module in (model, reference):
            torch.manual_seed(1)
            module(x).sum().backward()
    assert type(net[0]) is nn.Linear and isinstance(net[1], nn.LeakyReLU)
    torch.testing.assert_close(net[0].weight.grad, (reference.net if untraceable_parent else reference)[0].weight.grad)


def test_leaky_relu_outputs_changed_only_where_eager_saves_them_too_still_fuse():
    # In place itself (eager's saves its output then), or followed by out-of-place code.
    model = nn.Sequential(nn.Linear(6, 6), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(0.25, inplace=True),
                          nn.Linear(6, 6), nn.LeakyReLU(0.2), nn.Dropout(0.25), nn.Linear(6, 2))
    hnn.fuse(model)
    assert [d.fused for d in hnn.fusion_decisions(model)] == [True, True, False]  # the last: nothing follows it
    assert handgrad_ops(model, torch.randn(3, 6)) == ["linear_activation"] * 2


RECORDED = []  # a module-level store, as a hook-free feature recorder keeps one


class StoresWhatItComputes(nn.Module):
    """forward keeps what it computes beyond the call, or makes text of it. A traced program
    does neither: before, the stores held torch.fx Proxies after fuse(), and gained nothing
    at the calls; the print printed "Proxy(getattr_1)" once; and a branch on str(x.device)
    compared the text "Proxy(...)"."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
        self.features, self.stats = [], {"mean": torch.zeros(())}
        self.state = types.SimpleNamespace(last=torch.zeros(()))

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.how == "list attribute":
            self.features.append(h)
        elif self.how == "list attribute, then an untraceable branch":
            self.features.append(h)
            if h.sum() > 1e9:  # data-dependent: torch.fx stops here, with h stored already
                h = h * 2
        elif self.how == "dict attribute":
            self.stats["mean"] = h.mean()
        elif self.how == "global list":
            RECORDED.append(h.shape)
        elif self.how == "tuple in a list attribute":
            self.features.append((h, x))
        elif self.how == "nested dict attribute":
            self.stats["layer"] = {"mean": h.mean()}
        elif self.how == "attribute of a plain object":
            self.state.last = h.mean()
        elif self.how == "print":
            print("features", h.shape)
        elif self.how == "text of the device" and str(x.device) != "cpu":
            h = h * 2
        return self.head(h)


@pytest.mark.parametrize("how", ["list attribute", "list attribute, then an untraceable branch", "dict attribute",
                                 "global list", "tuple in a list attribute", "nested dict attribute",
                                 "attribute of a plain object", "print", "text of the device"])
def test_a_forward_that_stores_or_prints_what_it_computes_is_left_unfused_and_keeps_doing_it(how, capsys):
    torch.manual_seed(0)
    model = StoresWhatItComputes(how)
    reference = copy.deepcopy(model)
    RECORDED.clear()
    x = torch.randn(3, 4)
    # (The untraceable one warns at its first call, traced then with the inputs' shapes.)
    with pytest.warns(UserWarning, match="stores what it computes|makes text of what it computes|cannot trace"):
        fused = hnn.fuse(model)
        decision = [d for d in hnn.fusion_decisions(fused) if d.name == "fc"]
        assert decision and not decision[0].fused, decision
        # The traces left nothing of themselves in the stores, and the calls store as eager's do.
        assert RECORDED == [] and len(model.features) == 0 and list(model.stats) == ["mean"]
        assert type(model.state.last) is torch.Tensor
        capsys.readouterr()
        torch.testing.assert_close(fused(x), reference(x))
    if how == "print":
        assert capsys.readouterr().out.count("features torch.Size([3, 6])") == 2  # both calls printed
    assert len(model.features) == len(reference.features)
    torch.testing.assert_close((model.features, model.stats, vars(model.state)),
                               (reference.features, reference.stats, vars(reference.state)))
    assert RECORDED == [torch.Size([3, 6])] * 2 if how == "global list" else RECORDED == []


class DrawsPythonRandom(nn.Module):
    """Stochastic depth written with Python's or NumPy's generator: a traced program would
    keep the branch drawn at the trace (before: the head was skipped at every call, or never)."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.fc(x))
        draw = random.random() if self.generator == "random" else np.random.rand()
        return h[:, :2] if self.training and draw < 0.5 else self.head(h)


@pytest.mark.parametrize("generator", ["random", "numpy"])
def test_a_forward_that_draws_python_or_numpy_random_numbers_is_left_unfused(generator):
    torch.manual_seed(0)
    model = DrawsPythonRandom(generator)
    reference = copy.deepcopy(model)
    random.seed(0), np.random.seed(0)
    states = random.getstate(), np.random.get_state()[1].copy()
    with pytest.warns(UserWarning, match="random generator"):
        hnn.fuse(model)
    # fuse() drew nothing from them either.
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert not [d for d in hnn.fusion_decisions(model) if d.fused]
    x = torch.randn(3, 4)
    for net in (model, reference):
        random.seed(1), np.random.seed(1)
        net.outputs = [net(x) for _ in range(8)]
    torch.testing.assert_close(model.outputs, reference.outputs)


class BranchesOnTorchState(nn.Module):
    """forward asks torch what state ops run in. The program kept the answer of the trace:
    under torch.no_grad(), autocast, inference mode, deterministic algorithms or one thread
    the fused model took the other branch than eager (off by 0.5 to 2.5)."""

    def __init__(self, query):
        super().__init__()
        self.query = query
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.fc(x))
        if {"grad": torch.is_grad_enabled, "inference": torch.is_inference_mode_enabled,
                "deterministic": torch.are_deterministic_algorithms_enabled}.get(self.query, lambda: False)():
            h = h * 2
        if self.query == "autocast" and torch.is_autocast_enabled("cpu"):
            h = h * 3
        if self.query == "threads" and torch.get_num_threads() == 1:
            h = h * 4
        return self.head(h)


@contextlib.contextmanager
def _set_meanwhile(get, set_, value):
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


@pytest.mark.parametrize("query, state", [
    ("grad", torch.no_grad), ("inference", torch.inference_mode),
    ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ("deterministic", lambda: _set_meanwhile(torch.are_deterministic_algorithms_enabled,
                                             torch.use_deterministic_algorithms, True)),
    ("threads", lambda: _set_meanwhile(torch.get_num_threads, torch.set_num_threads, 1))])
def test_a_forward_that_branches_on_torchs_state_is_traced_again_for_each_state(query, state):
    torch.manual_seed(0)
    model = BranchesOnTorchState(query)
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    x = torch.randn(3, 4)
    for _ in range(2):  # there and back: each state keeps its program
        torch.testing.assert_close(model(x), reference(x))
        with state():
            torch.testing.assert_close(model(x), reference(x))
    assert [d.fused for d in hnn.fusion_decisions(model) if d.name == "fc"] == [True]


class LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.LazyLinear(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)))


def test_a_lazy_linear_fuses_once_its_first_call_has_given_it_a_shape():
    # Before, a model whose only pair had an nn.LazyLinear got no fused forward at all.
    torch.manual_seed(0)
    model = hnn.fuse(LazyNet())
    decision = [d for d in hnn.fusion_decisions(LazyNet()) if d.name == "fc"]
    assert not decision[0].fused and "LazyLinear" in decision[0].reason
    x = torch.randn(3, 5, requires_grad=True)
    first = model(x)  # the model's own calls: this one gives fc its shape
    reference = LazyNet()
    reference(x)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(first, reference(x))
    assert handgrad_ops(model, x) == ["linear_activation"]
    torch.testing.assert_close(outputs_and_grads(model, x), outputs_and_grads(reference, x))


USE_SKIP, SCALE, CALLS = False, 1.0, 0  # module globals that the next models' forwards read and set


class ScaledByAGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.fc(x)) * SCALE


class ReadsGlobals(nn.Module):
    """A flag at module level, read by forward and by a submodule's forward (traced through):
    the program kept the values of the trace, as torch.fx bakes globals."""

    def __init__(self):
        super().__init__()
        self.inner, self.fc, self.head = ScaledByAGlobal(), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc(self.inner(x)))
        if USE_SKIP:
            h = h + x
        return self.head(h)


def test_module_globals_that_forward_reads_are_read_again_at_each_call():
    global USE_SKIP, SCALE
    torch.manual_seed(0)
    model = ReadsGlobals()
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    x = torch.randn(3, 4)
    try:
        for USE_SKIP, SCALE in ((False, 1.0), (True, 1.0), (True, 2.0), (False, 1.0)):
            torch.testing.assert_close(model(x), reference(x), msg=f"USE_SKIP={USE_SKIP}, SCALE={SCALE}")
    finally:
        USE_SKIP, SCALE = False, 1.0
    assert handgrad_ops(model, x) == ["linear_activation"] * 2


class CountsItsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        global CALLS
        CALLS += 1
        return self.head(F.relu(self.fc(x)))


def test_a_forward_that_sets_module_globals_is_left_unfused_and_keeps_setting_them():
    model = CountsItsCalls()
    before = CALLS
    with pytest.warns(UserWarning, match="sets the module globals CALLS"):
        hnn.fuse(model)
    assert CALLS == before  # the trace's increments undone
    model(torch.randn(3, 4))
    model(torch.randn(3, 4))
    assert CALLS == before + 2
