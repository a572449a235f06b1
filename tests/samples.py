"""The shared cases of the test suite, by name: every handgrad function next to the eager
PyTorch code it replaces, the devices and dtypes, and the tolerances and float64-truth
comparisons the concern files hold them to. Tests import what they need from here;
conftest.py gives the `device` fixture.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import handgrad.functional as hf

# CPU always, CUDA where there is a GPU (and a CUDA build); the CUDA cases are collected
# everywhere, so that a run without a GPU lists them as skipped (conftest.py skips what is
# marked cuda there).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Slopes: the default, positive, 1 (the identity), 0 (ReLU), negative (f is recomputed), above 1.
SLOPES = [0.01, 0.2, 1.0, 0.0, -0.5, 1.5]
# softplus's (beta, threshold): the default; an SDF's beta=100, whose linear branch starts at
# f > 0.2; a low threshold that sends about a third of the samples to the linear branch.
SOFTPLUS = [(1.0, 20.0), (100.0, 20.0), (2.0, 1.0)]


def _fused_cases():
    cases = [
        pytest.param(hf.linear_relu, lambda x, w, b: F.relu(F.linear(x, w, b)), id="linear_relu"),
        pytest.param(
            hf.linear_sigmoid, lambda x, w, b: torch.sigmoid(F.linear(x, w, b)), id="linear_sigmoid"
        ),
        pytest.param(hf.linear_tanh, lambda x, w, b: torch.tanh(F.linear(x, w, b)), id="linear_tanh"),
        pytest.param(hf.linear_silu, lambda x, w, b: F.silu(F.linear(x, w, b)), id="linear_silu"),
        pytest.param(hf.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b)), id="linear_gelu"),
        pytest.param(lambda x, w, b: hf.linear_gelu(x, w, b, approximate="tanh"),
                     lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), id="linear_gelu_tanh"),
    ]
    for slope in SLOPES:
        cases.append(
            pytest.param(
                lambda x, w, b, s=slope: hf.linear_leaky_relu(x, w, b, negative_slope=s),
                lambda x, w, b, s=slope: F.leaky_relu(F.linear(x, w, b), s),
                id=f"linear_leaky_relu[{slope}]",
            )
        )
    for beta, threshold in SOFTPLUS:
        cases.append(
            pytest.param(
                lambda x, w, b, p=(beta, threshold): hf.linear_softplus(x, w, b, *p),
                lambda x, w, b, p=(beta, threshold): F.softplus(F.linear(x, w, b), *p),
                id=f"linear_softplus[{beta},{threshold}]",
            )
        )
    return cases


def _activation_cases():
    cases = [
        pytest.param(hf.relu, F.relu, id="relu"),
        pytest.param(hf.sigmoid, torch.sigmoid, id="sigmoid"),
        pytest.param(hf.tanh, torch.tanh, id="tanh"),
        pytest.param(hf.silu, F.silu, id="silu"),
        pytest.param(hf.gelu, F.gelu, id="gelu"),
        pytest.param(lambda x: hf.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"),
                     id="gelu_tanh"),
    ]
    for slope in SLOPES:
        cases.append(
            pytest.param(
                lambda x, s=slope: hf.leaky_relu(x, negative_slope=s),
                lambda x, s=slope: F.leaky_relu(x, s),
                id=f"leaky_relu[{slope}]",
            )
        )
    for beta, threshold in SOFTPLUS:
        cases.append(
            pytest.param(
                lambda x, p=(beta, threshold): hf.softplus(x, *p),
                lambda x, p=(beta, threshold): F.softplus(x, *p),
                id=f"softplus[{beta},{threshold}]",
            )
        )
    return cases


# Activations held to eager's accuracy against a float64 truth rather than to its bits:
# eager's float32 GELU is oneDNN's (another erf, and NaN at +inf where eager's float64 and
# strided paths give +inf), and its SiLU backward rounds in another order on some shapes.
NOT_EAGERS_BITS = {"silu", "gelu", "gelu_tanh", "linear_silu", "linear_gelu", "linear_gelu_tanh"}

# The cases as pytest parameters (fn, reference), each with its name as id; and by name.
FUSED_LAYERS = _fused_cases()
ACTIVATIONS = _activation_cases()
FUSED_LAYER = {case.id: case.values for case in FUSED_LAYERS}
ACTIVATION = {case.id: case.values for case in ACTIVATIONS}
NAME = {case.values[0]: case.id for case in (*FUSED_LAYERS, *ACTIVATIONS)}  # a case's function: its name


def pick(cases, *names):
    """The cases of these names, as pytest parameters."""
    chosen = [case for case in cases if case.id in names]
    assert len(chosen) == len(names), f"no case named {set(names) - {c.id for c in chosen}}"
    return chosen


# One case of each activation: relu, sigmoid, and leaky_relu with the default slope.
ONE_LAYER_OF_EACH = pick(FUSED_LAYERS, "linear_relu", "linear_sigmoid", "linear_leaky_relu[0.01]")
ONE_ACTIVATION_OF_EACH = pick(ACTIVATIONS, "relu", "sigmoid", "leaky_relu[0.01]")

# Every dtype eager's F.linear and activations support, on the CPU and CUDA.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tolerances(dtype):
    """assert_close tolerances against eager PyTorch.

    The forward is computed as eager's is (the bias added inside the GEMM, rounded once),
    so it agrees to the last rounding. In bfloat16 and float16 the gradients' GEMMs may add
    in another order than eager's, which can move a result by one rounding step of its own
    size; tests against a float64 truth (test_numerics.py) bound the error itself.
    """
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 2e-2}
    if dtype == torch.float16:
        return {"rtol": 4e-3, "atol": 4e-3}
    return {}


def grads(output, inputs, grad_output):
    """Gradients of <output, grad_output> w.r.t. those of `inputs` that require grad."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(output, wanted, grad_output)


def errors(value, truth):
    """Absolute differences from a float64 truth, flattened."""
    return (value.double() - truth.double()).abs().flatten()


def assert_as_accurate_as_eager(got, eager, truth, factor=2.0):
    """got is no farther from the float64 truth than eager's result is, within `factor` (sums
    in another order round differently) and one rounding step of the largest value: in the
    mean and at the 99th percentile, which a gross error moves and a few elements whose f
    rounded to the other side of a kink do not."""
    assert got.shape == eager.shape == truth.shape and got.dtype == eager.dtype
    if got.dtype == torch.float64:  # the truth is eager itself: agree to float64 rounding
        torch.testing.assert_close(got, truth.to(got.dtype))
        return
    if truth.numel() < 16:
        # Too few elements for a statistic: in low precision one stored value that rounded
        # the other way decides them (a saturated sigmoid's 1 - out moves 14 % with one
        # bfloat16 step). Held to eager's tolerances instead.
        torch.testing.assert_close(got, eager, **tolerances(got.dtype))
        return
    floor = torch.finfo(got.dtype).eps * truth.double().abs().max().item()
    ours, theirs = errors(got, truth), errors(eager, truth)
    for name, statistic in (("mean", torch.mean), ("99th percentile", lambda e: torch.quantile(e[:1 << 24], 0.99))):
        a, b = statistic(ours).item(), statistic(theirs).item()
        assert a <= factor * b + floor, f"{name} error {a:.3e} against float64, eager's {b:.3e}"


# --- Random layers on any device, against eager and a float64 truth ---

LOW_PRECISION = (torch.float16, torch.bfloat16)


def summation_order_tolerances(dtype):
    """Against eager: sums over many rows may add in another order (gradients, bias), which
    moves low bits; the float64-truth checks bound the error itself."""
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}.get(dtype, {})


def slack(dtype):
    """What "no worse than eager against the truth" allows on top: one rounding of the
    result's size in 8- and 11-bit types, two units in float32, whose sums over many rows
    add in a different (equally accurate) order than eager's."""
    eps = torch.finfo(dtype).eps
    return 2 * eps if dtype == torch.float32 else eps / 2


def assert_close_to_eager_gradient(got, want, dtype):
    """Gradients against eager's. In bfloat16 and float16 the GEMMs of the backward may add
    in another order than eager's: cuBLAS (and the CPU engine) picks its algorithm by layout, and where an
    incoming gradient is strided, eager's dl/df keeps its strides and ours is contiguous.
    Over thousands of rows single elements then differ by many roundings, so they are
    compared as a whole here (to 2 %), and against the float64 truth in check_layer."""
    if dtype in LOW_PRECISION:
        assert got.shape == want.shape and got.dtype == want.dtype
        # A handful of elements (a bias of 1, say) may each be a few roundings apart.
        bound = 2e-2 if got.numel() >= 16 else 8 * torch.finfo(dtype).eps
        assert relative_error(got, want.double()) <= bound
    else:
        torch.testing.assert_close(got, want, **summation_order_tolerances(dtype))


def relative_error(got, truth):
    return ((got.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def tensor_view(shape, layout):
    """How the tensor of `shape` is seen through its leaf (see random_tensor)."""
    if layout == "transposed" and len(shape) >= 2:
        return lambda leaf: leaf.transpose(-1, -2)
    if layout == "offset":
        return lambda leaf: leaf[1:].view(shape)
    return lambda leaf: leaf.view(shape)


def random_tensor(*shape, dtype, seed, device, layout="contiguous", scale=1.0):
    """A leaf on `device` of random normal values, and the tensor of `shape` seen through it.
    "offset" is contiguous but starts one element into its storage (not 16-byte aligned, so
    the scalar paths run); "transposed" has its last two dimensions swapped in memory."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        leaf_shape = (*shape[:-2], shape[-1], shape[-2])
    else:
        leaf_shape = (math.prod(shape) + (layout == "offset"),)
    leaf = (scale * torch.randn(*leaf_shape, generator=g)).to(device, dtype).requires_grad_()
    return tensor_view(shape, layout)(leaf), leaf


def check_layer(fn, reference, shape, out_features, dtype, layout, bias, device, grad_layout="contiguous"):
    """fn against reference (eager): values and gradients, and below float64 the error
    against a float64 truth no worse than eager's, give or take one rounding."""
    x, x_leaf = random_tensor(*shape, dtype=dtype, seed=0, device=device, layout=layout)
    w, w_leaf = random_tensor(out_features, shape[-1], dtype=dtype, seed=1, device=device, scale=shape[-1] ** -0.5)
    b, b_leaf = random_tensor(out_features, dtype=dtype, seed=2, device=device, layout=layout) if bias else (None, None)
    leaves = [t for t in (x_leaf, w_leaf, b_leaf) if t is not None]
    out, expected = fn(x, w, b), reference(x, w, b)
    assert out.dtype == expected.dtype and out.device == expected.device and out.is_contiguous()
    torch.testing.assert_close(out, expected, **summation_order_tolerances(dtype))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    if grad_layout == "expanded":
        g = g.flatten()[:1].expand(out.shape)
    elif grad_layout == "transposed" and g.dim() >= 2:
        g = g.transpose(-1, -2).contiguous().transpose(-1, -2)
    got, want = torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g)
    for a, e in zip(got, want):
        assert_close_to_eager_gradient(a, e, dtype)
    if grad_layout == "transposed" and dtype in LOW_PRECISION:
        # Eager's dl/df keeps a strided gradient's layout, ours is contiguous, and cuBLAS
        # picks another algorithm for each: for (8193 x 520)^T (8193 x 40) in float16 one
        # with reduced-precision split-K (1e-2 relative error, measured on an H100), the
        # other without (5e-4). With a contiguous gradient eager gets the same algorithm as
        # handgrad, so that is the error handgrad is held to here.
        want = torch.autograd.grad(reference(x, w, b), leaves, g.contiguous())
    if dtype != torch.float64 and out.numel() > 0:
        views = [tensor_view(shape, layout), tensor_view((out_features, shape[-1]), "contiguous"),
                 tensor_view((out_features,), layout)]
        exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
        exact_args = [view(t) for view, t in zip(views, exact_leaves)] + [None] * (3 - len(leaves))
        exact_out = reference(*exact_args)
        truth = (exact_out, *torch.autograd.grad(exact_out, exact_leaves, g.double()))
        for mine, eagers, exact in zip((out, *got), (expected, *want), truth):
            assert relative_error(mine, exact) <= 1.05 * relative_error(eagers, exact) + slack(dtype)


# The torch.nn module of each activation a network can have, given the network (for its
# parameters: negative_slope, beta, threshold).
TORCH_ACTIVATION_MODULE = {"relu": lambda m: torch.nn.ReLU(), "leaky_relu": lambda m: torch.nn.LeakyReLU(m.negative_slope),
                           "sigmoid": lambda m: torch.nn.Sigmoid(), "tanh": lambda m: torch.nn.Tanh(),
                           "silu": lambda m: torch.nn.SiLU(), "gelu": lambda m: torch.nn.GELU(),
                           "gelu_tanh": lambda m: torch.nn.GELU(approximate="tanh"),
                           "softplus": lambda m: torch.nn.Softplus(m.beta, m.threshold)}


def twin(model):
    """The same network as handgrad.nn.MLP `model` in torch.nn (Linear, activation, ...), with
    the same weights: with or without biases, with its output activation if it has one."""
    layers = []
    make = lambda name: TORCH_ACTIVATION_MODULE[name](model)  # noqa: E731
    for layer in [*model.hidden, model.output]:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                 dtype=layer.weight.dtype, device=layer.weight.device)
        linear.load_state_dict(layer.state_dict())
        layers += [linear, make(model.activation)]
    layers.pop()
    if model.output_activation is not None:
        layers.append(make(model.output_activation))
    return torch.nn.Sequential(*layers)
