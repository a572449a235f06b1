"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) parity with eager."""

import pytest
import torch
from torch import nn

import handgrad.nn as hnn

ops = torch.ops.handgrad


def opcheck_cases():
    def t(*shape, dtype=torch.float64, grad=True):
        return torch.randn(*shape, dtype=dtype, requires_grad=grad)

    cases = []
    for activation, slope in [("relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", -0.5), ("sigmoid", 0.0)]:
        name = f"{activation}[{slope}]"
        cases += [
            pytest.param(ops.linear_activation.default, (t(4, 5), t(3, 5), t(3), activation, slope), id=f"linear_{name}"),
            pytest.param(ops.linear_activation.default, (t(2, 3, 5), t(3, 5), None, activation, slope), id=f"linear_{name}_3d_nobias"),
            pytest.param(ops.linear_activation.default, (t(4, 5, dtype=torch.bfloat16, grad=False), t(3, 5, dtype=torch.bfloat16, grad=False), None, activation, slope), id=f"linear_{name}_bf16"),
            pytest.param(ops.activation.default, (t(3, 4), activation, slope), id=name),
            pytest.param(ops.activation.default, (t(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), activation, slope), id=f"{name}_channels_last"),
            pytest.param(ops.activation_.default, (t(3, 4, grad=False), activation, slope), id=f"{name}_"),
            pytest.param(ops.activation_backward.default, (t(3, 4), torch.rand(3, 4, dtype=torch.float64, requires_grad=True), activation, slope), id=f"{name}_backward"),
            pytest.param(ops.bias_activation_backward.default, (t(2, 3, 4), torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True), activation, slope), id=f"bias_{name}_backward"),
        ]
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            # Used only where the backward need not be differentiable: no grad-requiring args.
            cases.append(pytest.param(
                ops.linear_activation_backward.default,
                (t(600, 3, grad=False), t(600, 5, grad=False), t(3, 5, grad=False),
                 torch.rand(600, 3, dtype=torch.float64), activation, slope, mask),
                id=f"linear_{name}_backward_{mask}",
            ))
    return cases


@pytest.mark.parametrize("op,args", opcheck_cases())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


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
