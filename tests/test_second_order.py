"""The whole network's double backward (csrc/autograd/mlp.cpp, derived in
docs/second_order.md): gradcheck and gradgradcheck for every activation, with and without
biases, checkpointing and an output activation; the three kinds of second-order training
(a gradient penalty, an eikonal loss, a PINN's residual with u_xx, a third order) against
torch.nn and the per-layer path in float64; repeatability; torch.func."""

import pytest
import torch
from samples import NETWORK_ACTIVATIONS, assert_as_accurate_as_eager, twin
from torch.autograd import gradcheck, gradgradcheck

import handgrad
import handgrad.nn as hnn

ops = torch.ops.handgrad


@pytest.fixture(autouse=True)
def no_third_order_seen():
    # A network differentiated to a third order records its later forwards as a chain of
    # layers (csrc/autograd/mlp.cpp): each test starts with none seen.
    handgrad._C.set_layers_after_third_order(True)
    yield
    handgrad._C.set_layers_after_third_order(True)


def network_args(sizes, bias, seed=0, rows=3):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    weights = [leaf(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [leaf(o) for o in sizes[1:]] if bias else []
    return leaf(rows, sizes[0]), weights, biases


def network(activation, kwargs, every, output_activation, layers):
    def run(x, *parameters):
        return ops.mlp(x, list(parameters[:layers]), list(parameters[layers:]), activation,
                       kwargs.get("negative_slope", 0.01), every, output_activation, **{
                           key: value for key, value in kwargs.items() if key != "negative_slope"})
    return run


@pytest.mark.parametrize("activation,kwargs", NETWORK_ACTIVATIONS)
@pytest.mark.parametrize("output_activation", [None, "sigmoid", "tanh", "relu", "silu", "softplus"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("every", [0, 2], ids=["all_stored", "checkpoint_every_2"])
def test_gradgradcheck(activation, kwargs, output_activation, bias, every):
    sizes = [4, 5, 6, 3]
    x, weights, biases = network_args(sizes, bias)
    run = network(activation, kwargs, every, output_activation, len(weights))
    assert gradgradcheck(run, (x, *weights, *biases))

    def input_gradient(x, *parameters):  # a gradient penalty's: the cotangent on dl/dx alone
        (grad,) = torch.autograd.grad(run(x, *parameters).sum(), x, create_graph=True)
        return grad
    assert gradcheck(input_gradient, (x, *weights, *biases))


@pytest.mark.parametrize("activation,kwargs", NETWORK_ACTIVATIONS)
@pytest.mark.parametrize("sizes", [[4, 3], [4, 5, 6, 3]], ids=["one_layer", "three_layers"])
@pytest.mark.parametrize("then_layers", [False, True], ids=["one_node", "then_a_chain_of_layers"])
def test_third_order(activation, kwargs, sizes, then_layers):
    # A PINN's u_xx, differentiated once more: the double backward is itself differentiable.
    # one_node: every call differentiates the double backward's formula; otherwise the calls
    # after the first record the network as a chain of layers.
    handgrad._C.set_layers_after_third_order(then_layers)
    x, weights, biases = network_args(sizes, bias=True, seed=1)
    run = network(activation, kwargs, 0, "tanh", len(weights))

    def second_derivative(x, *parameters):
        (grad,) = torch.autograd.grad(run(x, *parameters).sum(), x, create_graph=True)
        (grad2,) = torch.autograd.grad(grad[:, 0].sum(), x, create_graph=True)
        return grad2
    assert gradcheck(second_derivative, (x, *weights, *biases))


def test_second_order_without_an_input_gradient():
    # Meta-learning differentiates the parameters' gradients, the input needing none.
    x, weights, biases = network_args([4, 5, 3], bias=True, seed=2)
    x = x.detach()
    run = network("tanh", {}, 0, None, len(weights))

    def parameter_gradients(*parameters):
        grads = torch.autograd.grad(run(x, *parameters).pow(2).sum(), parameters, create_graph=True)
        return sum(g.pow(2).sum() for g in grads)
    assert gradcheck(parameter_gradients, (*weights, *biases))


# The three kinds of second-order training, as small float64 networks.

def wgan_gp(model, g):
    real, fake = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g,
                                                                                    dtype=torch.float64)
    alpha = torch.rand(16, 1, generator=g, dtype=torch.float64)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_()
    out = model(interpolates)
    (gradients,) = torch.autograd.grad(out, interpolates, torch.ones_like(out), create_graph=True)
    return model(fake).mean() - model(real).mean() + 10 * ((gradients.norm(2, dim=1) - 1) ** 2).mean()


def eikonal(model, g):
    points = torch.randn(40, 3, generator=g, dtype=torch.float64).requires_grad_()
    sdf = model(points)
    (gradients,) = torch.autograd.grad(sdf, points, torch.ones_like(sdf), create_graph=True)
    return sdf[:30].abs().mean() + 0.1 * ((gradients[30:].norm(2, dim=1) - 1) ** 2).mean()


def burgers(model, g):
    xt = torch.rand(32, 2, generator=g, dtype=torch.float64).requires_grad_()
    u = model(xt)
    (du,) = torch.autograd.grad(u, xt, torch.ones_like(u), create_graph=True)
    (ddu,) = torch.autograd.grad(du[:, :1], xt, torch.ones_like(u), create_graph=True)
    residual = du[:, 1:] + u * du[:, :1] - (0.01 / torch.pi) * ddu[:, :1]
    return (residual ** 2).mean() + (model(xt.detach()) ** 2).mean()


KINDS = [  # loss, sizes, activation, its parameters, output activation
    pytest.param(wgan_gp, [12, 10, 8, 1], "leaky_relu", {"negative_slope": 0.2}, None, id="wgan_gp_leaky_relu"),
    pytest.param(eikonal, [3, 16, 16, 16, 1], "relu", {}, None, id="eikonal_relu"),
    pytest.param(burgers, [2, 8, 8, 8, 1], "tanh", {}, None, id="burgers_tanh"),
    pytest.param(burgers, [2, 8, 8, 1], "sigmoid", {}, "tanh", id="burgers_sigmoid_tanh_output"),
    pytest.param(eikonal, [3, 16, 16, 1], "leaky_relu", {"negative_slope": -0.3}, None,
                 id="eikonal_leaky_relu_negative"),
    pytest.param(burgers, [2, 12, 12, 1], "silu", {}, None, id="burgers_silu"),  # Modulus's
    pytest.param(eikonal, [3, 16, 16, 1], "gelu", {}, "gelu_tanh", id="eikonal_gelu_gelu_tanh_output"),
    # IGR's and NeuS's SDF: softplus(beta=100), both branches taken
    pytest.param(eikonal, [3, 16, 16, 1], "softplus", {"beta": 100.0}, None, id="eikonal_softplus_beta_100"),
    pytest.param(burgers, [2, 8, 8, 1], "tanh", {"beta": 3.0, "threshold": 2.0}, "softplus",
                 id="burgers_tanh_softplus_output"),
]


@pytest.mark.parametrize("loss,sizes,activation,kwargs,output_activation", KINDS)
@pytest.mark.parametrize("every", [None, 2], ids=["all_stored", "checkpoint_every_2"])
def test_training_steps_match_torch_nn_and_the_per_layer_path(loss, sizes, activation, kwargs,
                                                              output_activation, every):
    torch.manual_seed(0)
    mlp = hnn.MLP(sizes, activation, checkpoint_every=every, output_activation=output_activation,
                  dtype=torch.float64, **kwargs)
    reference = twin(mlp)
    per_layer = hnn.fuse(twin(mlp))  # the fused layers one by one, each with its own double backward
    # Two steps: after a third order (burgers) the second records a chain of layers.
    for step in range(2):
        found = {}
        for name, model in (("mlp", mlp), ("torch.nn", reference), ("per-layer", per_layer)):
            model.zero_grad(set_to_none=True)
            loss(model, torch.Generator().manual_seed(1 + step)).backward()
            found[name] = [p.grad for p in model.parameters()]
        assert len(found["mlp"]) == len(found["torch.nn"]) == len(found["per-layer"])
        for got, per_layer_grad, want in zip(found["mlp"], found["per-layer"], found["torch.nn"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(per_layer_grad, want, rtol=1e-10, atol=1e-12)


def u_xx(model, x):
    u = model(x)
    (du,) = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)
    (ddu,) = torch.autograd.grad(du[:, :1], x, torch.ones_like(u), create_graph=True)
    return ddu


def test_a_network_differentiated_to_a_third_order_then_records_a_chain_of_layers():
    torch.manual_seed(0)
    pinn, other = hnn.MLP([2, 8, 8, 1], "tanh"), hnn.MLP([2, 8, 9, 1], "tanh")
    x = torch.rand(16, 2, requires_grad=True)
    assert pinn(x).grad_fn.name() == "MLPBackward0"
    (torch.autograd.grad(pinn(x).sum(), x, create_graph=True)[0] ** 2).sum().backward()  # a penalty: no switch
    assert pinn(x).grad_fn.name() == "MLPBackward0"
    u_xx(pinn, x).sum().backward()  # a third order
    assert pinn(x).grad_fn.name() == "AddmmBackward0"  # the chain's linear output layer
    assert hnn.MLP([2, 8, 8, 1], "tanh")(x).grad_fn.name() == "AddmmBackward0"  # by shape
    assert pinn(x.detach()).grad_fn.name() == "MLPBackward0"  # no input gradient: one node
    x64 = x.detach().double().requires_grad_()
    assert hnn.MLP([2, 8, 8, 1], "tanh", dtype=torch.float64)(x64).grad_fn.name() == "MLPBackward0"  # another dtype
    assert hnn.MLP([2, 8, 8, 1], "sigmoid")(x).grad_fn.name() == "MLPBackward0"  # another activation
    assert other(x).grad_fn.name() == "MLPBackward0"  # another shape
    assert hnn.MLP([2, 8, 8, 1], "tanh", checkpoint_every=1)(x).grad_fn.name() == "MLPBackward0"
    assert handgrad._C.set_layers_after_third_order(False)  # the previous setting
    u_xx(pinn, x).sum().backward()
    assert pinn(x).grad_fn.name() == "MLPBackward0"  # off: nothing remembered


@pytest.mark.parametrize("threads", [1, 2])
def test_a_pinns_steps_are_the_same_bits_on_every_run(threads):
    # The first step differentiates the formula, the next ones the chain: each run repeats it.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for _ in range(2):
            handgrad._C.set_layers_after_third_order(True)
            torch.manual_seed(0)
            pinn = hnn.MLP([2, 16, 16, 1], "tanh", dtype=torch.float64)
            grads = []
            for step in range(3):
                pinn.zero_grad(set_to_none=True)
                burgers(pinn, torch.Generator().manual_seed(step)).backward()
                grads.append([p.grad.clone() for p in pinn.parameters()])
            runs.append(grads)
        for first, second in zip(*runs):
            assert all(torch.equal(a, b) for a, b in zip(first, second))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh", "softplus"])
def test_a_gradient_penalty_is_the_same_bits_on_every_run_and_thread_count(activation):
    torch.manual_seed(0)
    mlp = hnn.MLP([20, 64, 64, 1], activation, 0.2, beta=10.0)
    x = torch.randn(300, 20)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            mlp.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out = mlp(xi)
            (grad,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
            ((grad.norm(dim=1) - 1) ** 2).mean().backward()
            results.append((count, grad.detach(), [p.grad for p in mlp.parameters() if p.grad is not None]))
    finally:
        torch.set_num_threads(threads)
    for count, grad, parameter_grads in results[2:]:
        first_count, first_grad, first_parameter_grads = results[0 if count == 1 else 1]
        assert torch.equal(grad, first_grad)  # the same runs give the same bits
        assert all(torch.equal(a, b) for a, b in zip(parameter_grads, first_parameter_grads))
    # The input gradient is the engine's fused backward: the same bits on any thread count.
    assert torch.equal(results[0][1], results[1][1])


def test_a_penalty_leaves_zero_gradients_where_torch_nn_does():
    # ReLU's a'' = 0: a penalty alone gives the biases zero gradients, as eager does (not
    # None, which an optimizer would treat as "no step").
    torch.manual_seed(0)
    mlp = hnn.MLP([5, 7, 1], dtype=torch.float64)
    reference = twin(mlp)
    for model in (mlp, reference):
        x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
        (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        grad.pow(2).sum().backward()
    for got, want in zip(mlp.parameters(), reference.parameters()):
        assert (got.grad is None) == (want.grad is None)  # the linear output layer's bias: None
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(mlp.hidden[0].bias.grad) == 0 and torch.count_nonzero(mlp.hidden[0].weight.grad) > 0
    assert mlp.output.bias.grad is None


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "softplus"])
def test_torch_func_hessian_and_vmap_jacrev_agree_with_torch_nn(activation):
    torch.manual_seed(0)
    mlp = hnn.MLP([3, 6, 6, 1], activation, dtype=torch.float64)
    reference = twin(mlp)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = dict(mlp.named_parameters())
    params_ref = dict(reference.named_parameters())

    def scalar(model, p):
        return lambda xi: torch.func.functional_call(model, p, (xi,)).squeeze()
    for xi in x:
        torch.testing.assert_close(torch.func.hessian(scalar(mlp, params))(xi),
                                   torch.func.hessian(scalar(reference, params_ref))(xi))
    jac = torch.func.vmap(torch.func.jacrev(scalar(mlp, params)))(x)
    torch.testing.assert_close(jac, torch.func.vmap(torch.func.jacrev(scalar(reference, params_ref)))(x))


# --- The double backward op, mlp_double_backward: the fused engine's kernel on the CPU
# (csrc/cpu/kernels/fused_second_order.cpp), against autograd through torch.nn ---

OUTPUT_ACTIVATIONS = [None, "sigmoid", "tanh", "softplus"]
# Which results of the first backward get a cotangent: a gradient penalty's (dl/dx alone),
# meta-learning's (the parameters' gradients), or all of them (gradgradcheck's).
COTANGENTS = {"penalty": (True, False), "parameters": (False, True), "all": (True, True)}


def engine_runs(mlp, rows):
    """Whether the CPU double backward of `mlp` on `rows` rows runs in the fused engine."""
    weights = [layer.weight for layer in (*mlp.hidden, mlp.output)]
    return not handgrad._C.cpu_second_order_goes_to_blas(rows, weights)


def double_backward_case(mlp, rows, cotangents, seed=0, x=None):
    """The op's arguments for `mlp` on `rows` random rows, and the cotangents named."""
    g = torch.Generator().manual_seed(seed)
    dtype = mlp.output.weight.dtype
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    weights = [layer.weight.detach() for layer in (*mlp.hidden, mlp.output)]
    biases = [layer.bias.detach() for layer in (*mlp.hidden, mlp.output) if layer.bias is not None]
    x = rand(rows, weights[0].shape[1]) if x is None else x
    on_input, on_parameters = COTANGENTS[cotangents]
    return dict(x=x, weights=weights, biases=biases, grad_output=rand(rows, weights[-1].shape[0]),
                v=rand(*x.shape) if on_input else None,
                V=[rand(*w.shape) for w in weights] if on_parameters else [None] * len(weights),
                u=[rand(*b.shape) for b in biases] if on_parameters else [None] * len(biases))


def op_double_backward(mlp, case):
    kwargs = dict(beta=mlp.beta, threshold=mlp.threshold)
    _, hidden = ops.mlp_forward(case["x"], case["weights"], case["biases"], mlp.activation, mlp.negative_slope, 0,
                                mlp.output_activation, **kwargs)
    grad_grad_output, grad_input, grad_weights, grad_biases = ops.mlp_double_backward(
        case["grad_output"], case["x"], case["weights"], case["biases"], hidden, case["v"], case["V"], case["u"],
        mlp.activation, mlp.negative_slope, mlp.output_activation, [True] * 4, **kwargs)
    return [grad_grad_output, grad_input, *grad_weights, *grad_biases]


def autograd_double_backward(model, case, dtype):
    """The same derivatives by autograd through `model` (torch.nn), in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (case["grad_output"], case["x"])]
    parameters = dict(model.named_parameters())
    values = {name: p.detach().to(dtype).requires_grad_() for name, p in parameters.items()}
    out = torch.func.functional_call(model.to(dtype), values, (leaves[1],))
    inputs = [leaves[1], *values.values()]
    first = torch.autograd.grad(out, inputs, leaves[0], create_graph=True)
    weights_then_biases = sorted(range(len(values)), key=lambda i: not list(values)[i].endswith("weight"))
    cotangents = [case["v"], *[None] * len(values)]
    for slot, t in zip(weights_then_biases, [*case["V"], *case["u"]]):
        cotangents[1 + slot] = t
    chosen = [(f, c.to(dtype)) for f, c in zip(first, cotangents) if c is not None]
    found = torch.autograd.grad([f for f, _ in chosen], [leaves[0], *inputs], [c for _, c in chosen],
                                allow_unused=True, materialize_grads=True)
    grad_parameters = [found[2 + i] for i in weights_then_biases]
    return [found[0], found[1], *grad_parameters]


@pytest.mark.parametrize("activation,kwargs", NETWORK_ACTIVATIONS)
@pytest.mark.parametrize("output_activation", OUTPUT_ACTIVATIONS)
@pytest.mark.parametrize("sizes,rows,bias,cotangents", [
    *[pytest.param([5, 32, 24, 3], 7, True, c, id=f"small-{c}") for c in COTANGENTS],
    pytest.param([5, 32, 24, 3], 7, False, "all", id="small_no_bias-all"),
    pytest.param([3, 64, 64, 64, 1], 600, True, "all", id="many_blocks-all")])
def test_the_engines_double_backward_equals_autograd_through_torch_nn(activation, kwargs, output_activation,
                                                                      sizes, rows, bias, cotangents):
    torch.manual_seed(0)
    mlp = hnn.MLP(sizes, activation, bias=bias, output_activation=output_activation, dtype=torch.float64, **kwargs)
    case = double_backward_case(mlp, rows, cotangents)
    got = op_double_backward(mlp, case)
    want = autograd_double_backward(twin(mlp), case, torch.float64)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,kwargs", [("tanh", {}), ("silu", {}), ("softplus", {"beta": 2.0})])
def test_the_engines_double_backward_in_low_precision_is_as_accurate_as_eager(dtype, activation, kwargs):
    torch.manual_seed(0)
    mlp = hnn.MLP([4, 32, 32, 2], activation, output_activation="tanh", dtype=torch.float64, **kwargs)
    case = double_backward_case(mlp, 200, "all")
    truth = autograd_double_backward(twin(mlp), case, torch.float64)
    low = hnn.MLP([4, 32, 32, 2], activation, output_activation="tanh", dtype=dtype, **kwargs)
    low.load_state_dict(mlp.state_dict())
    low_case = {key: (value.to(dtype) if isinstance(value, torch.Tensor) else
                      [t.to(dtype) if t is not None else None for t in value] if isinstance(value, list) else value)
                for key, value in case.items()}
    got = op_double_backward(low, low_case)
    eager = autograd_double_backward(twin(low), low_case, dtype)
    # Each result as a whole: no farther from the float64 truth than twice eager's distance
    # (a network's roundings compound), plus one rounding step.
    for g, e, t in zip(got, eager, truth):
        assert g.dtype == dtype and g.shape == t.shape
        assert_as_accurate_as_eager(g, e, t, factor=2, extra=torch.finfo(dtype).eps)


def test_the_engines_double_backward_is_the_same_bits_for_every_thread_count():
    torch.manual_seed(0)
    mlp = hnn.MLP([3, 64, 64, 64, 1], "silu")
    case = double_backward_case(mlp, 600, "all")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            results.append(op_double_backward(mlp, case))
    finally:
        torch.set_num_threads(threads)
    # Where the formula runs on BLAS's products (the DEFAULT path), the guarantee is eager's:
    # the same bits from run to run on one thread count.
    for other in results[1:] if engine_runs(mlp, 600) else results[3:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_the_engines_double_backward_takes_strided_inputs_and_no_rows():
    torch.manual_seed(0)
    mlp = hnn.MLP([5, 32, 24, 3], "softplus", output_activation="sigmoid", dtype=torch.float64, beta=3.0)
    strided = torch.randn(5, 9, dtype=torch.float64).t()  # (9, 5), not contiguous
    case = double_backward_case(mlp, 9, "all", x=strided)
    want = autograd_double_backward(twin(mlp), case, torch.float64)
    for g, w in zip(op_double_backward(mlp, case), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    empty = double_backward_case(mlp, 0, "all")
    for g in op_double_backward(mlp, empty):
        assert g.numel() == 0 or torch.count_nonzero(g) == 0


def test_the_engine_runs_the_double_backward_where_it_measured_faster():
    # The shapes the tests above use run in the engine on AVX2 and AVX-512 (so those tests
    # test its kernel), as do the PINNs' narrow networks; wide layers with few rows go to the
    # formula on BLAS's products, and every shape on the DEFAULT path, whose SSE2 tiles lose.
    vectorized = handgrad.build_info()["cpu_capability"] != "DEFAULT"
    for sizes, rows in (([5, 32, 24, 3], 7), ([3, 64, 64, 64, 1], 600), ([4, 32, 32, 2], 200),
                        ([2] + [20] * 8 + [1], 4096), ([3, 256, 256, 256, 256, 1], 10240)):
        assert engine_runs(hnn.MLP(sizes), rows) == vectorized, (sizes, rows)
    for sizes, rows in (([784, 512, 256, 1], 64), ([784, 256, 256, 10], 1024), ([64, 256, 256, 10], 256)):
        assert not engine_runs(hnn.MLP(sizes), rows), (sizes, rows)


def test_the_double_backward_op_names_a_misshapen_cotangent():
    mlp = hnn.MLP([5, 8, 3], dtype=torch.float64)
    case = double_backward_case(mlp, 4, "all")
    case["V"][1] = case["V"][1].t()
    with pytest.raises(RuntimeError, match=r"mlp_double_backward: grad_grad_weights\[1\] has shape \[8, 3\] "
                                           r"but weights\[1\] has shape \[3, 8\]"):
        op_double_backward(mlp, case)
    case = double_backward_case(mlp, 4, "all")
    case["u"] = case["u"][:1]
    with pytest.raises(RuntimeError, match="grad_grad_biases has 1 entries for 2 biases"):
        op_double_backward(mlp, case)
