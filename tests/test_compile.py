"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) parity with eager."""

import pytest
import torch
from torch import nn

import handgrad.nn as hnn

ops = torch.ops.handgrad


def opcheck_samples():
    """torch.library.opcheck's samples of every op, by name: each a function of the device
    that gives (op, arguments). Float64 with gradients wherever the op is differentiable."""
    samples = {}

    def add(name, op, make_args):
        samples[name] = lambda device, kwargs=dict(kwargs): (op, make_args(device), kwargs)

    def t(*shape, device, dtype=torch.float64, grad=True):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=grad)

    def out_or_f(*shape, device, grad=True):
        return torch.rand(*shape, dtype=torch.float64, device=device, requires_grad=grad)

    # softplus's beta and threshold close every schema, so they go by name (a low threshold:
    # both branches).
    for activation, slope, kwargs in [("relu", 0.0, {}), ("leaky_relu", 0.2, {}), ("leaky_relu", -0.5, {}),
                                      ("sigmoid", 0.0, {}), ("softplus", 0.0, {"beta": 2.0, "threshold": 0.5})]:
        name = f"{activation}[{slope}]"
        a, s = activation, slope
        add(f"linear_{name}", ops.linear_activation.default,
            lambda d, a=a, s=s: (t(4, 5, device=d), t(3, 5, device=d), t(3, device=d), a, s))
        add(f"linear_{name}_3d_nobias", ops.linear_activation.default,
            lambda d, a=a, s=s: (t(2, 3, 5, device=d), t(3, 5, device=d), None, a, s))
        add(f"linear_{name}_bf16", ops.linear_activation.default,
            lambda d, a=a, s=s: (t(4, 5, device=d, dtype=torch.bfloat16, grad=False),
                                 t(3, 5, device=d, dtype=torch.bfloat16, grad=False), None, a, s))
        add(name, ops.activation.default, lambda d, a=a, s=s: (t(3, 4, device=d), a, s))
        add(f"{name}_channels_last", ops.activation.default,
            lambda d, a=a, s=s: (t(2, 3, 4, 5, device=d).contiguous(memory_format=torch.channels_last), a, s))
        add(f"{name}_", ops.activation_.default, lambda d, a=a, s=s: (t(3, 4, device=d, grad=False), a, s))
        add(f"{name}_backward", ops.activation_backward.default,
            lambda d, a=a, s=s: (t(3, 4, device=d), out_or_f(3, 4, device=d), a, s))
        add(f"bias_{name}_backward", ops.bias_activation_backward.default,
            lambda d, a=a, s=s: (t(2, 3, 4, device=d), out_or_f(2, 3, 4, device=d), a, s))
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            # Used only where the backward need not be differentiable: no grad-requiring args.
            add(f"linear_{name}_backward_{mask}", ops.linear_activation_backward.default,
                lambda d, a=a, s=s, mask=mask: (
                    t(600, 3, device=d, grad=False), t(600, 5, device=d, grad=False),
                    t(3, 5, device=d, grad=False), out_or_f(600, 3, device=d, grad=False), a, s, mask))
        for every in (0, 1):
            add(f"mlp_{name}_every{every}", ops.mlp.default,
                lambda d, a=a, s=s, every=every: (
                    t(2, 4, device=d), [t(5, 4, device=d), t(6, 5, device=d), t(3, 6, device=d)],
                    [t(5, device=d), t(6, device=d), t(3, device=d)], a, s, every))
            add(f"mlp_forward_{name}_every{every}", ops.mlp_forward.default,
                lambda d, a=a, s=s, every=every: (*_plain_network(d), a, s, every))
            for input_grad in (True, False):
                add(f"mlp_backward_{name}_every{every}_input_grad{input_grad}", ops.mlp_backward.default,
                    lambda d, a=a, s=s, every=every, input_grad=input_grad: _mlp_backward_args(d, a, s, every, input_grad))
        for cotangents in ("penalty", "all"):
            for output_activation in (None, "tanh"):
                add(f"mlp_double_backward_{name}_{cotangents}_{output_activation}", ops.mlp_double_backward.default,
                    lambda d, a=a, s=s, c=cotangents, o=output_activation, k=dict(kwargs):
                        _mlp_double_backward_args(d, a, s, c, o, k))
    # The network's other arguments: layers without biases, and an output activation.
    for bias, output_activation in ((False, None), (True, "sigmoid"), (False, "leaky_relu")):
        name = f"{'bias' if bias else 'no_bias'}_output_{output_activation}"
        add(f"mlp_{name}", ops.mlp.default,
            lambda d, b=bias, o=output_activation: (
                t(2, 4, device=d), [t(5, 4, device=d), t(6, 5, device=d), t(3, 6, device=d)],
                [t(5, device=d), t(6, device=d), t(3, device=d)] if b else [], "relu", 0.1, 0, o))
        add(f"mlp_forward_{name}", ops.mlp_forward.default,
            lambda d, b=bias, o=output_activation: (*_plain_network(d, b), "relu", 0.1, 0, o))
        add(f"mlp_backward_{name}", ops.mlp_backward.default,
            lambda d, b=bias, o=output_activation: _mlp_backward_args(d, "relu", 0.1, 0, True, b, o))
    return samples


def _plain_network(device, bias=True):
    """(input, weights, biases) of a 4 -> 5 -> 6 -> 3 network, none requiring grad."""
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device)

    return t(7, 4), [t(5, 4), t(6, 5), t(3, 6)], [t(5), t(6), t(3)] if bias else []


def _mlp_backward_args(device, activation, slope, every, input_grad, bias=True, output_activation=None):
    x, weights, biases = _plain_network(device, bias)
    _, hidden_outputs = ops.mlp_forward(x, weights, biases, activation, slope, every, output_activation)
    grad_output = torch.randn(7, 3, dtype=torch.float64, device=device)
    return (grad_output, x, weights, biases, hidden_outputs, activation, slope, every, input_grad, output_activation)


def _mlp_double_backward_args(device, activation, slope, cotangents, output_activation, kwargs):
    """Used only inside a backward, below autograd: no grad-requiring args. The hidden
    outputs are the network's own, with its softplus beta and threshold: a kernel that reads
    a' off them and one that reads it off f must agree."""
    x, weights, biases = _plain_network(device)
    _, hidden_outputs = ops.mlp_forward(x, weights, biases, activation, slope, 0, output_activation, **kwargs)
    t = lambda like: torch.randn_like(like)  # noqa: E731
    every = cotangents == "all"
    return (t(torch.empty(7, 3, dtype=torch.float64, device=device)), x, weights, biases, hidden_outputs, t(x),
            [t(w) if every else None for w in weights], [t(b) if every else None for b in biases],
            activation, slope, output_activation, [True, True, every, every])


OPCHECK_SAMPLES = opcheck_samples()


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_opcheck(device, sample):
    op, args, kwargs = OPCHECK_SAMPLES[sample](device)
    torch.library.opcheck(op, args, kwargs)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        hnn.LinearReLU(8, 16),
        hnn.LinearLeakyReLU(16, 16, negative_slope=0.1),
        hnn.LinearLeakyReLU(16, 16, negative_slope=-0.3),
        hnn.LinearSigmoid(16, 12),
        hnn.LeakyReLU(0.2),
        nn.Linear(12, 6),
        hnn.ReLU(inplace=True),
        nn.Linear(6, 6),
        hnn.LeakyReLU(0.1, inplace=True),
        hnn.ReLU(),
        hnn.Sigmoid(),
    )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, fullgraph=True)
    for batch in (5, 7):  # a second shape exercises recompilation / dynamic shapes
        x = torch.randn(batch, 8, requires_grad=True)
        out, expected = compiled(x), model(x)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        wanted = [x, *model.parameters()]
        for got, want in zip(torch.autograd.grad(out, wanted, g), torch.autograd.grad(expected, wanted, g)):
            torch.testing.assert_close(got, want)


def test_compiled_graph_contains_our_ops():
    torch._dynamo.reset()
    seen = []

    def backend(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    model = make_model()
    torch.compile(model, fullgraph=True, backend=backend)(torch.randn(3, 8))
    assert any(target.startswith("handgrad.linear_activation") for target in seen)
    assert any(target.startswith("handgrad.activation") for target in seen)
    # The in-place activations, functionalized (auto_functionalized) or as they are.
    assert sum("handgrad.activation_" in target for target in seen) == 2


def make_wide_model(device):
    torch.manual_seed(0)
    return nn.Sequential(
        hnn.LinearReLU(64, 128), hnn.LinearLeakyReLU(128, 128, negative_slope=0.1),
        hnn.LinearSigmoid(128, 32), nn.Linear(32, 8), hnn.ReLU(inplace=True),
    ).to(device)


def test_compile_fullgraph_parity_of_a_wider_model(device):
    torch._dynamo.reset()
    model = make_wide_model(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 64, device=device, requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x))
    params = [x, *model.parameters()]
    for got, want in zip(torch.autograd.grad(compiled(x).sum(), params),
                         torch.autograd.grad(model(x).sum(), params)):
        torch.testing.assert_close(got, want)


def test_compiled_autograd_runs_our_backward_nodes():
    # Compiled autograd (torch._dynamo.config.compiled_autograd, as its tutorial sets it)
    # captures the backward graph, our Functions' nodes included, and must give eager's
    # gradients: the whole network's op, fused layers (SiLU's as f's node and a[f]'s), an
    # activation and an in-place one.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(hnn.MLP([8, 16, 16, 6]), hnn.LinearTanh(6, 6), hnn.LinearSiLU(6, 6), hnn.Sigmoid(),
                          nn.Linear(6, 4), hnn.ReLU(inplace=True))
    x = torch.randn(5, 8)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = step()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(compiled_autograd=True):
        got = torch.compile(step)()
    assert torch._dynamo.utils.counters["compiled_autograd"]["captures"] >= 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
