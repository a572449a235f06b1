"""The shared cases of the test suite, by name: every handgrad function next to the eager
PyTorch code it replaces, the devices and dtypes, and the tolerances and float64-truth
comparisons the concern files hold them to. Tests import what they need from here;
conftest.py gives the `device` fixture.
"""

import contextlib
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


# The tests' one table of the activations by name, each taking its parameters by name as
# torch.nn does (leaky_relu's negative_slope, softplus's beta and threshold): eager
# PyTorch's function, handgrad's standalone activation and handgrad's fused layer.
def eager_activation(name, negative_slope=0.01, beta=1.0, threshold=20.0):
    return {"relu": F.relu, "leaky_relu": lambda f: F.leaky_relu(f, negative_slope), "sigmoid": torch.sigmoid,
            "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda f: F.gelu(f, approximate="tanh"),
            "softplus": lambda f: F.softplus(f, beta, threshold)}[name]


def eager_network(x, weights, biases, activation, slope, output_activation=None, stored_as=None,
                  beta=1.0, threshold=20.0):
    """The network in eager PyTorch: F.linear and torch's activations (both activations take
    slope, beta and threshold). stored_as=dtype rounds each hidden output to dtype, as a
    network in that dtype stores it: the truth for a low-precision network is the float64
    network with its stored values."""
    parameters = dict(negative_slope=slope, beta=beta, threshold=threshold)
    h = x
    for layer, weight in enumerate(weights):
        h = F.linear(h, weight, biases[layer] if biases else None)
        if layer + 1 < len(weights):
            h = eager_activation(activation, **parameters)(h)
            if stored_as is not None:
                h = h.to(stored_as).to(h.dtype)
        elif output_activation is not None:
            h = eager_activation(output_activation, **parameters)(h)
    return h


def handgrad_activation(name, negative_slope=0.01, beta=1.0, threshold=20.0):
    return {"relu": hf.relu, "leaky_relu": lambda x: hf.leaky_relu(x, negative_slope=negative_slope),
            "sigmoid": hf.sigmoid, "tanh": hf.tanh, "silu": hf.silu, "gelu": hf.gelu,
            "gelu_tanh": lambda x: hf.gelu(x, approximate="tanh"),
            "softplus": lambda x: hf.softplus(x, beta, threshold)}[name]


def fused_layer(name, negative_slope=0.01, beta=1.0, threshold=20.0):
    return {"relu": hf.linear_relu, "leaky_relu": lambda x, w, b: hf.linear_leaky_relu(x, w, b, negative_slope=negative_slope),
            "sigmoid": hf.linear_sigmoid, "tanh": hf.linear_tanh, "silu": hf.linear_silu, "gelu": hf.linear_gelu,
            "gelu_tanh": lambda x, w, b: hf.linear_gelu(x, w, b, approximate="tanh"),
            "softplus": lambda x, w, b: hf.linear_softplus(x, w, b, beta, threshold)}[name]


def eager_layer(name, **parameters):
    """Eager PyTorch's F.linear, then the activation: what fused_layer(name) replaces."""
    activation = eager_activation(name, **parameters)
    return lambda x, w, b: activation(F.linear(x, w, b))


# Each activation once, leaky_relu at every slope of SLOPES and softplus at every SOFTPLUS.
CASES = ([("relu", {}, ""), ("sigmoid", {}, ""), ("tanh", {}, ""), ("silu", {}, ""), ("gelu", {}, ""),
           ("gelu_tanh", {}, "")]
          + [("leaky_relu", {"negative_slope": s}, f"[{s}]") for s in SLOPES]
          + [("softplus", {"beta": b, "threshold": t}, f"[{b},{t}]") for b, t in SOFTPLUS])


def _fused_cases():
    return [pytest.param(fused_layer(name, **p), eager_layer(name, **p), id=f"linear_{name}{suffix}")
            for name, p, suffix in CASES]


def _activation_cases():
    return [pytest.param(handgrad_activation(name, **p), eager_activation(name, **p), id=f"{name}{suffix}")
            for name, p, suffix in CASES]


# The activations of the network tests, with their parameters as handgrad.nn.MLP takes them:
# leaky_relu on both sides of zero (a negative slope hides f's sign), and softplus with a low
# threshold (2 f > 1 is linear), so that every network here has both branches.
NETWORK_ACTIVATIONS = [pytest.param(name, p, id=i) for name, p, i in (
    ("relu", {}, "relu"), ("leaky_relu", {"negative_slope": 0.2}, "leaky_relu"),
    ("leaky_relu", {"negative_slope": -0.3}, "leaky_relu_negative"), ("sigmoid", {}, "sigmoid"),
    ("tanh", {}, "tanh"), ("silu", {}, "silu"), ("gelu", {}, "gelu"), ("gelu_tanh", {}, "gelu_tanh"),
    ("softplus", {"beta": 2.0, "threshold": 1.0}, "softplus"))]
# The first four, as (activation, negative_slope): the activations the fused engine's
# first-order tests cover, where the slope is all the parameters there are.
NETWORK_SLOPES = [pytest.param(case.values[0], case.values[1].get("negative_slope", 0.0), id=case.id)
                  for case in NETWORK_ACTIVATIONS[:4]]


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


def tolerances(dtype, summed=False):
    """The one tolerance policy against eager PyTorch (assert_close's rtol and atol).

    A result made as eager makes it (a layer's forward: the bias added inside the product
    and rounded once) agrees to assert_close's defaults in float32 and float64, and to about
    one rounding step in bfloat16 and float16. A result that sums over many rows (a gradient,
    a bias gradient, a network's output), `summed`, may add in another order than eager's:
    its low bits move, by up to one rounding step of its own size. The error itself is bounded
    against a float64 truth by assert_as_accurate_as_eager.
    """
    if summed:
        return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
                torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}.get(dtype, {})
    return {torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}.get(dtype, {})


def leaves(tensors):
    """Fresh leaves of the same values, each requiring grad."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def gradients(fn, args, grad_output):
    """fn's output and its gradients with respect to every one of args (as fresh leaves)."""
    args = leaves(args)
    out = fn(*args)
    return [out.detach(), *torch.autograd.grad(out, args, grad_output)]


@contextlib.contextmanager
def num_threads(count):
    """torch's intra-op thread count set to count inside the block, and restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def same_bits_for_every_thread_count(fn, args, grad_output, blas=False):
    """The engine's own kernel: the same bits on every run and thread count. Where the
    products go to BLAS (blas=True), or on another device than the CPU, eager's guarantee:
    the same bits on every run."""
    reference = gradients(fn, args, grad_output)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3, 4, 1):
            torch.set_num_threads(threads if blas else count)
            for got, want in zip(gradients(fn, args, grad_output), reference):
                assert torch.equal(got, want), f"different bits with {count} threads"
    finally:
        torch.set_num_threads(threads)


def grads(output, inputs, grad_output):
    """Gradients of <output, grad_output> w.r.t. those of `inputs` that require grad."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(output, wanted, grad_output)


def relative_error(got, truth):
    """The error of a whole tensor against its float64 truth: |got - truth| / |truth| (norms)."""
    return ((got.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-300)).item()


def slack(dtype):
    """What "as accurate as eager" allows on top of eager's error: one rounding of the
    result's size in 8- and 11-bit types, two units in float32, whose sums over many rows
    add in a different (equally accurate) order than eager's."""
    eps = torch.finfo(dtype).eps
    return 2 * eps if dtype == torch.float32 else eps / 2


def assert_as_accurate_as_eager(got, eager, truth, factor=1.05, extra=None):
    """The one "as accurate as eager" criterion: got is no farther from the float64 truth
    than eager's result is, within `factor` and `extra` (slack(dtype) unless given).

    factor is 1.05 for one layer, whose products add in another order than eager's BLAS;
    a network, whose roundings compound through its layers and kinks (an element whose f
    rounded to the other side of ReLU's), is held to 2. In float64 the truth is eager
    itself: agree to float64 rounding."""
    assert got.shape == eager.shape == truth.shape and got.dtype == eager.dtype
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, truth.to(got.dtype))
        return
    ours, theirs = relative_error(got, truth), relative_error(eager, truth)
    allowed = factor * theirs + (slack(got.dtype) if extra is None else extra)
    if ours > allowed and truth.numel() < 16:
        # Too few elements for the whole tensor's error to be a steady measure: in low
        # precision one stored value that rounded the other way decides it (a saturated
        # sigmoid's 1 - out moves 14 % with one bfloat16 step). Eager's tolerances then.
        torch.testing.assert_close(got, eager, **tolerances(got.dtype, summed=True))
        return
    assert ours <= allowed, f"error {ours:.3e} against float64, eager's {theirs:.3e}"


# --- Random layers on any device, against eager and a float64 truth ---

LOW_PRECISION = (torch.float16, torch.bfloat16)


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
        torch.testing.assert_close(got, want, **tolerances(dtype, summed=True))


# The tests' one vocabulary of argument layouts (random_tensor): "contiguous"; "offset",
# contiguous but one element into its storage (not 16-byte aligned, so the scalar paths
# run); "transposed", the last two dimensions swapped in memory; "sliced", every other
# element of a wider last dimension, from the second on; "expanded", the first dimension a
# stride-0 broadcast of one row.
LAYOUTS = ("contiguous", "offset", "transposed", "sliced", "expanded")


def _leaf_shape(shape, layout):
    if layout == "transposed" and len(shape) >= 2:
        return (*shape[:-2], shape[-1], shape[-2])
    if layout == "sliced" and len(shape) >= 1:
        return (*shape[:-1], 2 * shape[-1])
    if layout == "expanded" and len(shape) >= 1:
        return (1, *shape[1:])
    return (math.prod(shape) + (layout == "offset"),)


def tensor_view(shape, layout):
    """How the tensor of `shape` is seen through its leaf (see random_tensor)."""
    if layout == "transposed" and len(shape) >= 2:
        return lambda leaf: leaf.transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        return lambda leaf: leaf[..., 1::2]
    if layout == "expanded" and len(shape) >= 1:
        return lambda leaf: leaf.expand(shape)
    if layout == "offset":
        return lambda leaf: leaf[1:].view(shape)
    return lambda leaf: leaf.view(shape)


def random_tensor(*shape, dtype, seed, device="cpu", layout="contiguous", scale=1.0, integers=False):
    """A leaf on `device` of random normal values (or, with `integers`, small integers: exact
    in every dtype, so that f = 0 occurs), and the tensor of `shape` seen through it in one
    of LAYOUTS."""
    assert layout in LAYOUTS, layout
    g = torch.Generator().manual_seed(seed)
    leaf_shape = _leaf_shape(shape, layout)
    values = torch.randint(-3, 4, leaf_shape, generator=g).double() if integers else torch.randn(*leaf_shape, generator=g)
    leaf = (scale * values).to(device, dtype).requires_grad_()
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
    torch.testing.assert_close(out, expected, **tolerances(dtype, summed=True))
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
            assert_as_accurate_as_eager(mine, eagers, exact)


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
        with torch.no_grad():  # the weight as the layer computes it (under weight norm too)
            linear.weight.copy_(layer.weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        layers += [linear, make(model.activation)]
    layers.pop()
    if model.output_activation is not None:
        layers.append(make(model.output_activation))
    return torch.nn.Sequential(*layers)


def handgrad_ops(model, *args, **kwargs):
    """The handgrad ops model(*args, **kwargs) calls, by name, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    called = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "handgrad":
                called.append(func._schema.name.split("::")[1])
            return func(*args, **(kwargs or {}))

    with Record():
        model(*args, **kwargs)
    return called
