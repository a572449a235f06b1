"""The whole-network op (torch.ops.handgrad.mlp) and handgrad.nn.MLP: the same values and
gradients as the network in torch.nn, in every dtype and shape, and everything PyTorch
offers around it: gradcheck, double backward, opcheck, compile, export, torch.func,
hooks."""

import io

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from samples import (
    NETWORK_SLOPES,
    DTYPES,
    assert_as_accurate_as_eager,
    assert_close_to_eager_gradient,
    tolerances,
    twin,
)
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import handgrad.functional as hf
import handgrad.nn as hnn

ops = torch.ops.handgrad


def parameters(model):
    layers = [*model.hidden, model.output]
    return [layer.weight for layer in layers], [layer.bias for layer in layers]


@pytest.mark.parametrize("activation,slope", NETWORK_SLOPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 6), (6,), (2, 3, 6), (0, 6)], ids=str)
@pytest.mark.parametrize("every", [None, 1, 2])
def test_mlp_matches_torch_nn(activation, slope, dtype, shape, every):
    torch.manual_seed(0)
    model = hnn.MLP([6, 9, 8, 7, 3], activation, slope, checkpoint_every=every, dtype=dtype)
    reference = twin(model)
    x = torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_()
    out, expected = model(x), reference(x)
    assert out.shape == expected.shape and out.dtype == dtype and not out._is_view()
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, [x, *model.parameters()], g)
    want = torch.autograd.grad(expected, [x, *reference.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerances(dtype))


@pytest.mark.parametrize("activation,slope", NETWORK_SLOPES)
@pytest.mark.parametrize("every", [0, 2])
def test_gradcheck_and_gradgradcheck(activation, slope, every):
    g = torch.Generator().manual_seed(0)
    sizes = [4, 5, 6, 3]
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64, requires_grad=True)
               for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.randn(o, generator=g, dtype=torch.float64, requires_grad=True) for o in sizes[1:]]
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def network(x, *params):
        return ops.mlp(x, list(params[:3]), list(params[3:]), activation, slope, every)

    assert gradcheck(network, (x, *weights, *biases))
    assert gradgradcheck(network, (x, *weights, *biases))


def test_single_linear_layer_and_input_without_grad():
    model = hnn.MLP([5, 2])
    x = torch.randn(4, 5)
    out = model(x)
    torch.testing.assert_close(out, model.output(x))
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    torch.testing.assert_close(grads, torch.autograd.grad(model.output(x).sum(), list(model.parameters())))
    x.requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(model(x).sum(), x),
                               torch.autograd.grad(model.output(x).sum(), x))


def test_compile_fullgraph_and_export():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = hnn.MLP([6, 9, 8, 3], "leaky_relu", 0.1, checkpoint_every=1)
    compiled = torch.compile(model, fullgraph=True)
    for batch in (4, 5):
        x = torch.randn(batch, 6, requires_grad=True)
        out, expected = compiled(x), model(x)
        torch.testing.assert_close(out, expected)
        wanted = [x, *model.parameters()]
        for a, b in zip(torch.autograd.grad(out.sum(), wanted), torch.autograd.grad(expected.sum(), wanted)):
            torch.testing.assert_close(a, b)
    x = torch.randn(4, 6)
    program = torch.export.export(model, (x,))
    assert "handgrad.mlp.default" in {str(node.target) for node in program.graph.nodes}
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.export.load(buffer).module()(x), model(x))


def test_forward_ad_and_torch_func_run_layer_by_layer():
    torch.manual_seed(0)
    model = hnn.MLP([4, 6, 5, 2], "sigmoid", dtype=torch.float64)
    reference = twin(model)
    x, tangent = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent
        want = fwAD.unpack_dual(reference(fwAD.make_dual(x, tangent))).tangent
    torch.testing.assert_close(got, want)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def per_sample_loss(p, xi):
        return torch.func.functional_call(model, p, (xi,)).square().sum()

    grads = torch.func.vmap(torch.func.grad(per_sample_loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        expected = torch.autograd.grad(reference(x[i]).square().sum(), list(reference.parameters()))
        for name, e in zip(params, expected):
            torch.testing.assert_close(grads[name][i], e)
    torch.testing.assert_close(torch.func.vmap(model)(x), reference(x))


def test_vmap_of_the_op_itself():
    weights, biases = [torch.randn(5, 4), torch.randn(2, 5)], [torch.randn(5), torch.randn(2)]
    x = torch.randn(3, 7, 4)
    torch.testing.assert_close(
        torch.func.vmap(lambda xi: ops.mlp(xi, weights, biases, "relu", 0.0, 0))(x),
        ops.mlp(x, weights, biases, "relu", 0.0, 0))
    # A batched weight: each sample runs with its own.
    first_weights = torch.randn(3, 5, 4)
    torch.testing.assert_close(
        torch.func.vmap(lambda xi, wi: ops.mlp(xi, [wi, weights[1]], biases, "relu", 0.0, 0))(x, first_weights),
        torch.stack([ops.mlp(x[i], [first_weights[i], weights[1]], biases, "relu", 0.0, 0) for i in range(3)]))


def test_hooks_on_a_layer_keep_firing():
    model = hnn.MLP([4, 6, 5, 2])
    seen = []
    handle = model.hidden[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(3, 4)
    out = model(x)
    assert seen == [torch.Size([3, 5])]
    torch.testing.assert_close(out, twin(model)(x))
    handle.remove()
    assert model(x).grad_fn.name() == "MLPBackward0"  # one op again


def test_state_dict_keys_and_repr_are_unchanged():
    model = hnn.MLP([4, 6, 5, 2], checkpoint_every=2)
    assert list(model.state_dict()) == ["hidden.0.weight", "hidden.0.bias", "hidden.1.weight",
                                        "hidden.1.bias", "output.weight", "output.bias"]
    assert "checkpoint_every=2" in repr(model)


def test_bad_arguments_are_named():
    weights, biases = [torch.randn(5, 4), torch.randn(2, 6)], [torch.randn(5), torch.randn(2)]
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"mlp: weights\[1\] has 6 columns but the layer before has 5 features"):
        hf.mlp(x, weights, biases)
    with pytest.raises(RuntimeError, match=r"mlp: got 2 weights but 1 biases"):
        hf.mlp(x, weights[:1] + [torch.randn(2, 5)], biases[:1])
    with pytest.raises(RuntimeError, match=r"mlp: biases\[0\] must have shape \[5\]"):
        hf.mlp(x, [weights[0], torch.randn(2, 5)], [torch.randn(4), biases[1]])
    with pytest.raises(RuntimeError, match=r"mlp: weights\[0\] has dtype torch.float64 but input has dtype torch.float32"):
        hf.mlp(x, [weights[0].double(), torch.randn(2, 5)], biases)
    with pytest.raises(NotImplementedError, match=r"mlp: weights\[0\] has layout torch.sparse_coo"):
        ops.mlp(x, [weights[0].to_sparse(), torch.randn(2, 5)], biases, "relu", 0.0, 0)
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        hf.mlp(x, [weights[0], torch.randn(2, 5)], biases, activation="elu")
    with pytest.raises(TypeError, match=r"mlp\(\): argument 'weights\[1\]' \(position 2\) must be Tensor, not str"):
        hf.mlp(x, [weights[0], "w"], biases)


@pytest.mark.parametrize("batch", [10, 100])
def test_the_books_network_is_as_close_to_float64_as_torch_nn(batch):
    # Figure 7.8's network: handgrad's fused kernel adds in another order than torch's BLAS,
    # so not the same bits, but no farther from a float64 truth, output and every gradient.
    torch.manual_seed(0)
    model = hnn.MLP([10, 40, 40, 5])
    reference, truth = twin(model), twin(model).double()
    x = torch.randn(batch, 10, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, expected, true = model(x), reference(x), truth(x64)
    assert_as_accurate_as_eager(out, expected, true, factor=2)
    g = torch.randn_like(out)
    for a, b, c in zip(torch.autograd.grad(out, [x, *model.parameters()], g),
                       torch.autograd.grad(expected, [x, *reference.parameters()], g),
                       torch.autograd.grad(true, [x64, *truth.parameters()], g.double())):
        assert_as_accurate_as_eager(a, b, c, factor=2)


def test_wrapped_layers_are_called_as_modules_so_the_wrapper_does_its_job():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing, checkpoint_wrapper)

    torch.manual_seed(0)
    model = hnn.MLP([6, 9, 8, 3])
    reference = twin(model)
    x = torch.randn(5, 6, requires_grad=True)
    expected = reference(x)
    want = torch.autograd.grad(expected.sum(), [x, *reference.parameters()])
    # checkpoint_wrapper per layer, as apply_activation_checkpointing does it.
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, hnn.LinearReLU))
    assert all(type(layer).__name__ == "CheckpointWrapper" for layer in model.hidden)
    out = model(x)
    assert out.grad_fn.name() != "MLPBackward0"  # layer by layer: the wrapper's checkpoints
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), [x, *model.parameters()]), want):
        torch.testing.assert_close(a, b)
    # A layer under weight norm is called as a module too (its pre-hook recomputes the weight).
    normed = hnn.MLP([6, 9, 3])
    torch.nn.utils.parametrizations.weight_norm(normed.hidden[0])
    torch.testing.assert_close(normed(x), twin(normed)(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("every", [None, 2])
@pytest.mark.parametrize("bias,output_activation", [(True, None), (False, None), (True, "sigmoid"), (False, "leaky_relu")])
def test_mlp_matches_torch_nn_sequential(device, dtype, every, bias, output_activation):
    # CUDA's mlp runs the per-layer ops (csrc/mlp_per_layer.cpp), the CPU's the fused engine.
    torch.manual_seed(0)
    model = hnn.MLP([32, 64, 48, 40, 10], "leaky_relu", 0.1, checkpoint_every=every, bias=bias,
                    output_activation=output_activation, device=device, dtype=dtype)
    reference = twin(model)
    x = torch.randn(300, 32, device=device, dtype=dtype, requires_grad=True)
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, **tolerances(dtype, summed=True))
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, [x, *model.parameters()], g),
                    torch.autograd.grad(expected, [x, *reference.parameters()], g)):
        assert_close_to_eager_gradient(a, e, dtype)


def test_a_network_pickled_before_softplus_still_runs():
    # A whole-module pickle made before MLP had beta and threshold lacks them.
    mlp = hnn.MLP([4, 6, 2])
    state = mlp.__dict__.copy()
    del state["beta"], state["threshold"]
    old = hnn.MLP.__new__(hnn.MLP)
    old.__dict__.update(state)
    x = torch.randn(3, 4)
    torch.testing.assert_close(old(x), mlp(x))
