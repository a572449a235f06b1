"""What "drop-in" promises beyond values: outputs that in-place ops can modify, in-place
activations with torch.nn's signatures, eager's memory formats, clear refusals of sparse and
nested tensors, PyTorch's own ModuleInfo samples, and the C++ autograd path itself."""

import concurrent.futures
import copy
import inspect
import re
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from samples import ACTIVATIONS, FUSED_LAYERS, ONE_ACTIVATION_OF_EACH, grads
from torch import nn

import handgrad.functional as hf
import handgrad.nn as hnn

IN_PLACE_EDITS = {
    "add_": lambda y, skip: y.add_(skip),
    "+=": lambda y, skip: y.__iadd__(skip),
    "mul_": lambda y, skip: y.mul_(0.5),
    "relu_": lambda y, skip: y.relu_(),
}
OUT_OF_PLACE = {
    "add_": lambda y, skip: y + skip,
    "+=": lambda y, skip: y + skip,
    "mul_": lambda y, skip: y * 0.5,
    "relu_": lambda y, skip: y.relu(),
}


def leaves(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
            for shape in ((2, 3, 5), (4, 5), (4,))]


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("edit", IN_PLACE_EDITS)
def test_in_place_edit_of_the_output_gives_eagers_values_and_right_or_refused_gradients(fn, reference, edit):
    x, w, b = leaves()
    skip = torch.randn(2, 3, 4, dtype=torch.float64)
    y = fn(x, w, b)
    assert not y._is_view() and y.is_contiguous()
    IN_PLACE_EDITS[edit](y, skip)  # the op itself succeeds, as on F.linear's output
    torch.testing.assert_close(y, OUT_OF_PLACE[edit](reference(x, w, b), skip))
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    truth = torch.autograd.grad(OUT_OF_PLACE[edit](reference(x, w, b), skip), (x, w, b), g)
    try:
        got = torch.autograd.grad(y, (x, w, b), g)
    except RuntimeError as error:  # autograd's own check of the saved output's version
        assert "modified by an inplace operation" in str(error)
        return
    for a, e in zip(got, truth):
        torch.testing.assert_close(a, e)


def test_in_place_edits_are_refused_only_where_the_backward_reads_the_output():
    # The test above accepts a refusal; this one pins down where it comes: a layer whose a'
    # is read off its output (ReLU, sigmoid) refuses a backward after the output was edited,
    # as eager's does, and one whose a' is read off f (SiLU, softplus) gives eager's gradients.
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    for fn, reads_output in ((hf.linear_relu, True), (hf.linear_sigmoid, True), (hf.linear_silu, False),
                             (hf.linear_softplus, False)):
        x, w, b = leaves()
        y = fn(x, w, b)
        y.mul_(0.5)
        if reads_output:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(y, (x, w, b), g)
        else:
            truth = torch.autograd.grad(fn(x, w, b) * 0.5, (x, w, b), g)
            for got, want in zip(torch.autograd.grad(y, (x, w, b), g), truth):
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
def test_in_place_edit_without_autograd(fn, reference):
    x, w, b = (t.detach() for t in leaves())
    y = fn(x, w, b)
    y += 1.0
    torch.testing.assert_close(y, reference(x, w, b) + 1.0)


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
def test_activation_output_can_be_edited_in_place(fn, reference):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = fn(x * 1)
    assert not y._is_view()
    y.mul_(2)
    torch.testing.assert_close(y, 2 * reference(x))


# --- In-place activations: nn.ReLU(inplace=True), nn.LeakyReLU(slope, inplace=True) ---


@pytest.mark.parametrize("ours,theirs,arguments", [
    (hnn.ReLU, nn.ReLU, [(), (True,)]), (hnn.LeakyReLU, nn.LeakyReLU, [(), (0.2,), (0.2, True), (1,)]),
    (hnn.Sigmoid, nn.Sigmoid, [()]), (hnn.Tanh, nn.Tanh, [()]), (hnn.SiLU, nn.SiLU, [(), (True,)]),
    (hnn.GELU, nn.GELU, [(), ("tanh",)]), (hnn.Softplus, nn.Softplus, [(), (2,), (0.5, 10)])],
    ids=lambda value: value.__name__ if isinstance(value, type) else "")
def test_activation_modules_are_torch_nn_activations(ours, theirs, arguments):
    # Subclasses of torch.nn's, with their signatures, attributes and reprs: code that finds
    # activations by isinstance (initialization by gain, a hook on every ReLU) finds these.
    assert issubclass(ours, theirs)
    assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    for args in arguments:
        module, reference = ours(*args), theirs(*args)
        assert repr(module) == repr(reference)
        assert {k: v for k, v in vars(module).items() if not k.startswith("_")} == \
               {k: v for k, v in vars(reference).items() if not k.startswith("_")}
        x = torch.randn(3, 5, dtype=torch.float64)
        torch.testing.assert_close(module(x.clone()), reference(x.clone()))


INPLACE = [
    pytest.param(lambda x: hnn.ReLU(inplace=True)(x), F.relu_, id="ReLU(inplace=True)"),
    pytest.param(lambda x: hf.relu(x, inplace=True), F.relu_, id="relu(inplace=True)"),
    pytest.param(lambda x: hnn.LeakyReLU(0.2, inplace=True)(x), lambda x: F.leaky_relu_(x, 0.2),
                 id="LeakyReLU(0.2, inplace=True)"),
    pytest.param(lambda x: hf.leaky_relu(x, 1.5, inplace=True), lambda x: F.leaky_relu_(x, 1.5),
                 id="leaky_relu(1.5, inplace=True)"),
]


@pytest.mark.parametrize("ours,theirs", INPLACE)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided view"])
def test_in_place_activation_writes_into_its_input(ours, theirs, layout):
    base = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for activation in (ours, theirs):
        x = base * 1  # a non-leaf, as in a model
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        target = x[..., ::2] if layout == "strided view" else x
        version = target._version
        y = activation(target)
        assert y is target and target._version == version + 1
        results.append((x, *torch.autograd.grad((x * x).sum(), base)))
    torch.testing.assert_close(results[0], results[1])


def test_in_place_activation_on_a_leaf_is_refused_as_in_eager():
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        hnn.ReLU(inplace=True)(leaf)
    with torch.no_grad():  # allowed without autograd, as F.relu_
        hnn.ReLU(inplace=True)(leaf)
    assert (leaf >= 0).all()


@pytest.mark.parametrize("ours,theirs", INPLACE)
def test_in_place_activation_bumps_the_version_without_autograd_too(ours, theirs):
    x = torch.randn(4, 5)
    expected = theirs(x.clone())
    version = x._version
    assert ours(x) is x and x._version == version + 1
    torch.testing.assert_close(x, expected)


def test_in_place_activation_on_overlapping_memory_is_refused_as_in_eager():
    x = torch.randn(1, 4).expand(3, 4)
    with pytest.raises(RuntimeError, match="single memory location"):
        hf.relu(x, inplace=True)


def test_changed_output_of_in_place_activation_fails_the_backward():
    base = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = hf.relu(base * 1, inplace=True)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_in_place_leaky_relu_with_negative_slope_refuses_its_backward_as_eager_does():
    base = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = hf.leaky_relu(base * 1, -0.5, inplace=True)
    torch.testing.assert_close(y, F.leaky_relu(base, -0.5))
    with pytest.raises(RuntimeError, match="negative slope"):
        y.sum().backward()


def test_in_place_activation_under_forward_ad_and_vmap():
    x, tangent = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), tangent)
        out = fwAD.unpack_dual(hf.relu(dual * 1, inplace=True))
    torch.testing.assert_close(out.tangent, tangent * (x > 0))
    batch = torch.randn(3, 4)
    torch.testing.assert_close(torch.func.vmap(lambda v: hf.relu(v.clone(), inplace=True))(batch), batch.relu())


# --- Memory formats ---


def memory_format_cases():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "channels_last_3d": torch.randn(2, 3, 2, 4, 5, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last_3d),
        "transposed": torch.randn(6, 5, dtype=torch.float64).t(),
        "permuted": x.permute(3, 1, 0, 2),
        "sliced channels_last": x.contiguous(memory_format=torch.channels_last)[:, :, ::2],
    }


@pytest.mark.parametrize("case", memory_format_cases())
@pytest.mark.parametrize("fn,reference", ONE_ACTIVATION_OF_EACH)
def test_activations_keep_the_memory_format_of_eager(case, fn, reference):
    x = memory_format_cases()[case].requires_grad_()
    out, expected = fn(x), reference(x)
    assert out.stride() == expected.stride()
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(expected)
    got, want = torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0]
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", memory_format_cases())
def test_fused_output_is_contiguous_as_f_linear(case):
    x = memory_format_cases()[case]
    w = torch.randn(3, x.shape[-1], dtype=torch.float64)
    out = hf.linear_sigmoid(x, w)
    assert out.is_contiguous() and F.linear(x, w).is_contiguous()
    torch.testing.assert_close(out, torch.sigmoid(F.linear(x, w)))


# --- Non-strided layouts ---


def test_sparse_and_nested_tensors_get_one_line_that_names_them():
    dense = torch.randn(3, 4)
    sparse = dense.to_sparse()
    cases = [
        (lambda: hf.linear_relu(sparse, torch.randn(2, 4)), "linear_relu: input has layout torch.sparse_coo"),
        (lambda: hf.linear_sigmoid(dense, torch.randn(2, 4).to_sparse()), "linear_sigmoid: weight has layout torch.sparse_coo"),
        (lambda: hf.relu(dense.to_sparse_csr()), "relu: input has layout torch.sparse_csr"),
        (lambda: torch.ops.handgrad.activation(sparse, "sigmoid", 0.0), "sigmoid: input has layout torch.sparse_coo"),
        (lambda: hf.leaky_relu(torch.nested.nested_tensor([dense, dense[:2]])), "leaky_relu: input is a nested tensor"),
        (lambda: hf.linear_relu(torch.nested.nested_tensor([dense, dense[:2]], layout=torch.jagged),
                                torch.randn(2, 4)), "linear_relu: input is a nested tensor"),
    ]
    for call, start in cases:
        with pytest.raises(NotImplementedError) as error:
            call()
        message = str(error.value)
        assert message.startswith(start) and "only dense (strided) tensors are supported" in message
        assert "\n" not in message
    with torch.inference_mode(), pytest.raises(NotImplementedError, match="sparse_coo"):
        hf.relu(sparse)


# --- PyTorch's ModuleInfo samples ---


def module_samples(module_cls):
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls is module_cls]
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                   training=True)


ACTIVATION_MODULES = [(hnn.ReLU, nn.ReLU), (hnn.LeakyReLU, nn.LeakyReLU), (hnn.Sigmoid, nn.Sigmoid),
                      (hnn.Tanh, nn.Tanh), (hnn.SiLU, nn.SiLU), (hnn.GELU, nn.GELU), (hnn.Softplus, nn.Softplus)]


@pytest.mark.parametrize("ours,theirs", ACTIVATION_MODULES, ids=lambda cls: cls.__name__)
def test_module_info_samples_of_activations(ours, theirs):
    # Softplus(2, -100) among them: a negative threshold is torch's too.
    samples = module_samples(theirs)
    assert samples
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        (x,) = sample.forward_input.args
        out, expected = ours(*args, **kwargs)(x), theirs(*args, **kwargs)(x)
        assert out.shape == expected.shape and out.stride() == expected.stride()
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(expected)
        torch.testing.assert_close(grads(out, [x], g), grads(expected, [x], g))


@pytest.mark.parametrize("ours,activation", [
    (hnn.LinearReLU, nn.ReLU()), (hnn.LinearSigmoid, nn.Sigmoid()), (hnn.LinearLeakyReLU, nn.LeakyReLU()),
    (hnn.LinearTanh, nn.Tanh()), (hnn.LinearSiLU, nn.SiLU()), (hnn.LinearGELU, nn.GELU()),
    (hnn.LinearSoftplus, nn.Softplus())], ids=lambda value: value.__name__ if isinstance(value, type) else "")
def test_module_info_samples_of_linear(ours, activation):
    for sample in module_samples(nn.Linear):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        layer = ours(*args, **kwargs, dtype=torch.float64)
        torch.manual_seed(0)
        reference = nn.Linear(*args, **kwargs, dtype=torch.float64)
        (x,) = [*sample.forward_input.args, *sample.forward_input.kwargs.values()]
        out, expected = layer(x), activation(reference(x))
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(expected)
        torch.testing.assert_close(grads(out, [x, *layer.parameters()], g),
                                   grads(expected, [x, *reference.parameters()], g))


# --- The wiring ---


def test_layers_record_their_own_node_and_forward_ad_uses_the_python_function():
    x, w, b = leaves()
    assert hf.linear_relu(x, w, b).grad_fn.name() == "LinearActivationBackward0"
    assert hf.sigmoid(x).grad_fn.name() == "ActivationBackward0"
    assert hf.linear_silu(x, w, b).grad_fn.name() == "ActivationBackward0"  # a[f] over f's own node
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        assert type(hf.linear_relu(dual, w, b).grad_fn).__name__ == "LinearReLUFunctionBackward"


def _holding_saved(run):
    """run()'s result, and weak references to what its node holds for each tensor it saves."""
    class Packed:
        def __init__(self, tensor):
            self.tensor = tensor

    held = []

    def pack(tensor):
        packed = Packed(tensor)
        held.append(weakref.ref(packed))
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed.tensor):
        return run(), held


def test_the_layers_node_frees_what_it_saved_and_refuses_a_tangent_it_cannot_carry():
    x, w, b = leaves()
    weights = [w.detach().clone().requires_grad_(), torch.randn(2, 4, dtype=w.dtype, requires_grad=True)]
    biases = [b.detach().clone().requires_grad_(), torch.randn(2, dtype=b.dtype, requires_grad=True)]
    calls = {  # what each keeps: h, Omega, out; h and Omega (f's node), f (a[f]'s); h, the
        # parameters and the hidden outputs the engine stored
        "relu layer": (lambda: torch.ops.handgrad.linear_activation(x, w, b, "relu"), range(3, 4)),
        "silu layer": (lambda: torch.ops.handgrad.linear_activation(x, w, b, "silu"), range(3, 4)),
        "sigmoid": (lambda: torch.ops.handgrad.activation(x, "sigmoid"), range(1, 2)),  # out
        "silu": (lambda: torch.ops.handgrad.activation(x, "silu"), range(1, 2)),  # its input
        "network": (lambda: torch.ops.handgrad.mlp(x, weights, biases, "relu"), range(5, 7)),
    }
    for name, (call, counts) in calls.items():
        out, held = _holding_saved(call)
        assert len(held) in counts and all(ref() is not None for ref in held), name
        out.sum().backward()
        assert all(ref() is None for ref in held), name
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            out.sum().backward()
    # Called as the op, below handgrad.functional, a tangent is refused rather than dropped.
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward AD with handgrad::linear_activation.*linear_relu"):
            torch.ops.handgrad.linear_activation(dual, w, b, "relu")
        with pytest.raises(RuntimeError, match="forward AD with handgrad::mlp.*handgrad.nn.MLP"):
            torch.ops.handgrad.mlp(dual, weights, biases, "relu")
        with pytest.raises(RuntimeError, match="forward AD with handgrad::activation.*handgrad.functional"):
            torch.ops.handgrad.activation(dual, "silu")


def test_the_nodes_serve_backwards_of_one_graph_on_several_threads_at_once():
    x, w, b = leaves()
    weights = [w, torch.randn(2, 4, dtype=w.dtype, requires_grad=True)]
    biases = [b, torch.randn(2, dtype=b.dtype, requires_grad=True)]
    outs = [hf.linear_relu(x, w, b), torch.ops.handgrad.mlp(x, weights, biases, "relu")]
    expected = [torch.autograd.grad(out.sum(), (x, w, b), retain_graph=True) for out in outs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda i: torch.autograd.grad(outs[i % 2].sum(), (x, w, b), retain_graph=True), range(16)))
    for i, got in enumerate(results):
        for g, e in zip(got, expected[i % 2], strict=True):
            assert torch.equal(g, e)


def test_calls_autograd_does_not_record_make_no_node():
    x, w, b = leaves()
    with torch.no_grad():
        assert hf.linear_relu(x, w, b).grad_fn is None
    assert hf.linear_relu(x.detach(), w.detach(), b.detach()).grad_fn is None


def test_fused_backward_op_refuses_to_be_recorded():
    x, w, b = leaves()
    out = hf.linear_relu(x, w, b).detach()
    with pytest.raises(RuntimeError, match="linear_relu_backward: this fused backward is not differentiable"):
        torch.ops.handgrad.linear_activation_backward(torch.ones_like(out), x, w, out, "relu", 0.0,
                                                      [True, True, True])


def test_in_place_activation_and_channels_last(device):
    base = torch.randn(2, 3, 4, 6, device=device, requires_grad=True)
    for make in (lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last)):
        x, y = make(base * 1), make(base * 1)
        assert hnn.LeakyReLU(0.2, inplace=True)(x) is x
        F.leaky_relu_(y, 0.2)
        assert x.stride() == y.stride()
        torch.testing.assert_close(torch.autograd.grad(x.sum(), base)[0], torch.autograd.grad(y.sum(), base)[0])


# --- Dtypes the kernels do not take: torch's own results ---


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_a_complex_network_runs_as_torch_runs_it(dtype):
    """A complex-valued network (torch.nn's layers take complex dtypes): handgrad.nn.MLP, the
    fused layers and fuse() give torch's outputs and gradients, with torch's own ops."""
    import handgrad

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 8, dtype=dtype), nn.Tanh(), nn.Linear(8, 8, dtype=dtype),
                              nn.Sigmoid(), nn.Linear(8, 3, dtype=dtype))
    fused = handgrad.fuse(copy.deepcopy(reference))
    assert [d.fused for d in hnn.fusion_decisions(fused)] == [True, True, False]  # run by handgrad's functions
    network = hnn.MLP([6, 8, 3], activation="tanh", dtype=dtype)
    twin = nn.Sequential(nn.Linear(6, 8, dtype=dtype), nn.Tanh(), nn.Linear(8, 3, dtype=dtype))
    twin[0].load_state_dict(network.hidden[0].state_dict())
    twin[2].load_state_dict(network.output.state_dict())
    x = torch.randn(5, 6, dtype=dtype)
    g = torch.randn(5, 3, dtype=dtype)
    for ours, theirs in ((fused, reference), (network, twin)):
        out, expected = ours(x), theirs(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(out, list(ours.parameters()), g),
                                   torch.autograd.grad(expected, list(theirs.parameters()), g), rtol=0, atol=0)


def test_activation_modules_take_integers_as_torch_nn_does():
    x = torch.arange(-3, 4)
    assert torch.equal(hnn.ReLU()(x), nn.ReLU()(x)) and hnn.ReLU()(x).dtype == torch.int64
    y = x.clone()
    assert hnn.ReLU(inplace=True)(y) is y and torch.equal(y, nn.ReLU()(x))
    torch.testing.assert_close(hnn.Sigmoid()(x), nn.Sigmoid()(x), rtol=0, atol=0)  # a float result
    with pytest.raises(NotImplementedError) as theirs:
        nn.GELU()(x)
    with pytest.raises(NotImplementedError, match=re.escape(str(theirs.value))):
        hnn.GELU()(x)
