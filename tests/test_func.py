"""Forward-mode AD (problem 7.13) and torch.func: jvp, vmap, per-sample gradients, jacrev,
jacfwd, hessian (gradcheck in every mode is in test_gradcheck.py)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from samples import ACTIVATIONS, FUSED_LAYERS

import handgrad
import handgrad.autograd



def double(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
def test_forward_mode_ad_matches_eager(fn, reference):
    primals = (double(4, 5, seed=1), double(3, 5, seed=2), double(3, seed=3))
    tangents = (double(4, 5, seed=4), double(3, 5, seed=5), double(3, seed=6))
    results = []
    for f in (fn, reference):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            results.append(fwAD.unpack_dual(f(*duals)))
    torch.testing.assert_close(results[0].primal, results[1].primal)
    torch.testing.assert_close(results[0].tangent, results[1].tangent)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
@pytest.mark.parametrize("with_tangent", ["input", "weight", "bias"])
def test_jvp_with_one_tangent(fn, reference, with_tangent):
    x, w, b = double(2, 3, 5, seed=1), double(3, 5, seed=2), double(3, seed=3)
    index = ["input", "weight", "bias"].index(with_tangent)

    def partial(f):
        return lambda t: f(*[t if i == index else a for i, a in enumerate((x, w, b))])

    primal = (x, w, b)[index]
    tangent = torch.ones_like(primal)
    got = torch.func.jvp(partial(fn), (primal,), (tangent,))
    want = torch.func.jvp(partial(reference), (primal,), (tangent,))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("fn,reference", ACTIVATIONS)
def test_activation_jvp(fn, reference):
    x, t = double(4, 6, seed=1), double(4, 6, seed=2)
    for g, e in zip(torch.func.jvp(fn, (x,), (t,)), torch.func.jvp(reference, (x,), (t,))):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
def test_vmap_over_input_and_over_weight(fn, reference):
    x, w, b = double(3, 4, 5, seed=1), double(3, 6, 5, seed=2), double(6, seed=3)
    torch.testing.assert_close(
        torch.func.vmap(lambda xi: fn(xi, w[0], b))(x), reference(x, w[0], b)
    )
    torch.testing.assert_close(
        torch.func.vmap(lambda xi, wi: fn(xi, wi, b))(x, w),
        torch.stack([reference(x[i], w[i], b) for i in range(3)]),
    )


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
def test_per_sample_gradients_with_vmap_of_grad(fn, reference):
    x, y = double(8, 4, 5, seed=1), double(8, 4, 3, seed=2)
    params = (double(3, 5, seed=3), double(3, seed=4))

    def loss(f):
        return lambda p, xi, yi: ((f(xi, p[0], p[1]) - yi) ** 2).mean()

    got = torch.func.vmap(torch.func.grad(loss(fn)), in_dims=(None, 0, 0))(params, x, y)
    want = torch.func.vmap(torch.func.grad(loss(reference)), in_dims=(None, 0, 0))(params, x, y)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("fn,reference", FUSED_LAYERS)
def test_jacrev_jacfwd_and_hessian_agree_with_eager(fn, reference):
    w, b, x = double(3, 5, seed=1), double(3, seed=2), double(5, seed=3)
    expected = torch.func.jacrev(lambda v: reference(v, w, b))(x)
    torch.testing.assert_close(torch.func.jacrev(lambda v: fn(v, w, b))(x), expected)
    torch.testing.assert_close(torch.func.jacfwd(lambda v: fn(v, w, b))(x), expected)
    torch.testing.assert_close(
        torch.func.hessian(lambda v: fn(v, w, b).pow(2).sum())(x),
        torch.func.hessian(lambda v: reference(v, w, b).pow(2).sum())(x),
    )


# The C++ autograd kernels (csrc/autograd/) and the Python Functions
# (handgrad.autograd) keep the same tensors for the backward: each says so where it saves.
# One difference is by design: where a' is read off f, the C++ layer keeps f (as eager does),
# and the Python Function, which can keep only its inputs and outputs, keeps beta instead and
# recomputes f.
MIRRORED = [("relu", "LinearReLUFunction", (), {}), ("sigmoid", "LinearSigmoidFunction", (), {}),
            ("silu", "LinearSiLUFunction", (), {}), ("leaky_relu", "LinearLeakyReLUFunction", (0.2,), {}),
            ("leaky_relu", "LinearLeakyReLUFunction", (-0.3,), {"negative_slope": -0.3}),
            ("softplus", "LinearSoftplusFunction", (2.0, 5.0), {"beta": 2.0, "threshold": 5.0})]


def _saved_names(run, known, by_value=None):
    """What run() saves for its backward, each named by the tensor of `known` it is (by
    storage and shape), or else of `by_value` it equals, or "other"."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    known = {**known, "output": out if isinstance(out, torch.Tensor) else out[0]}
    def name(t):
        return next((name for name, k in known.items() if t.data_ptr() == k.data_ptr() and t.shape == k.shape),
                    next((name for name, v in (by_value or {}).items() if torch.equal(t, v)), "other"))
    return sorted(name(t) for t in saved)


@pytest.mark.parametrize("activation,function,arguments,parameters", MIRRORED,
                         ids=[f"{m[1]}{m[2]}" for m in MIRRORED])
def test_the_cpp_and_python_functions_of_a_layer_save_the_same_tensors(activation, function, arguments,
                                                                       parameters):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    slope = parameters.get("negative_slope", 0.01)
    keyword = {k: v for k, v in parameters.items() if k != "negative_slope"}
    known = {"input": x, "weight": w, "bias": b}
    reads_f = handgrad._C.derivative_needs_preactivation(
        activation, slope, parameters.get("beta", 1.0), parameters.get("threshold", 20.0))
    f = torch.nn.functional.linear(x, w, b).detach()
    cpp = _saved_names(lambda: torch.ops.handgrad.linear_activation(x, w, b, activation, slope, **keyword), known,
                       by_value={"f": f})
    python = _saved_names(lambda: getattr(handgrad.autograd, function).apply(x, w, b, *arguments), known)
    assert "other" not in cpp and "other" not in python
    assert ("output" in cpp) != reads_f and ("f" in cpp) == reads_f
    # Where f is read, the Python Function keeps beta to recompute it; the C++ layer keeps f.
    assert cpp == (sorted([n for n in python if n != "bias"] + ["f"]) if reads_f else python)


@pytest.mark.parametrize("activation,function,arguments,parameters", MIRRORED,
                         ids=[f"{m[1]}{m[2]}" for m in MIRRORED])
def test_the_cpp_and_python_functions_of_an_activation_and_its_backward_save_the_same_tensors(
        activation, function, arguments, parameters):
    # The standalone activation (ActivationBackward0 / <stem>Function) and the differentiable
    # backward pieces a recorded backward is built of (ActivationBackwardFunction and
    # BiasActivationBackwardFunction / _ActivationBackward and _BiasActivationBackward).
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = (parameters.get("negative_slope", 0.01), parameters.get("beta", 1.0), parameters.get("threshold", 20.0))
    standalone = getattr(handgrad.autograd, function.replace("Linear", "", 1))
    cpp = _saved_names(lambda: torch.ops.handgrad.activation(x, activation, *params), {"input": x})
    python = _saved_names(lambda: standalone.apply(x, *arguments), {"input": x})
    assert cpp == python and "other" not in cpp and len(cpp) == 1
    for op, piece in ((torch.ops.handgrad.activation_backward, handgrad.autograd._ActivationBackward),
                      (torch.ops.handgrad.bias_activation_backward, handgrad.autograd._BiasActivationBackward)):
        known = {"grad_output": g, "out_or_f": x}
        cpp = _saved_names(lambda: op(g, x, activation, *params), known)
        python = _saved_names(lambda: piece.apply(g, x, activation, *params), known)
        assert cpp == python == ["grad_output", "out_or_f"], op
