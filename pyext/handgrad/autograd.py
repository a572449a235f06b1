"""The torch.autograd.Functions of handgrad, over the torch.ops.handgrad operators: the
readable reference of the chapter's backward.

A fused layer computes f = beta + Omega h and out = a[f]. It saves h, Omega and out (never
f), and its backward is the chapter's:

    dl/df     = dl/d(out) * a'[f]       a' read off out (7.7, 7.10)
    dl/dh     = Omega^T dl/df           (7.6)
    dl/dOmega = dl/df h^T               (7.9), summed over the batch
    dl/dbeta  = sum of dl/df            made in the same pass as dl/df

The formulas themselves are written once, in csrc/activation.h, and run inside the ops;
these Functions only orchestrate. The same orchestration is compiled into the ops' own C++
autograd kernels (csrc/autograd/), which handgrad.functional uses for speed.
These Python Functions serve what the C++ autograd API cannot: forward-mode AD (each has a
jvp) and torch.func transforms (vmap rules in _vmap.py, generate_vmap_rule below).

A plain backward runs as one fused op (linear_activation_backward). When the backward is
itself recorded (create_graph=True, torch.func), it is built from differentiable pieces
instead: the Functions _ActivationBackward and _BiasActivationBackward, which have their
own backward and jvp, and ATen matrix products. So double backward works.

LeakyReLU with a negative slope is the one case where out does not tell the sign of f
(both sides of zero give out >= 0). There the layer keeps the same tensors and recomputes f
in the backward: one more matrix product, no extra memory.
"""

import torch

from . import _C

# The ops' default overloads: calling an overload directly skips the overload resolution
# of torch.ops.handgrad.<name>(...), several microseconds a call.
_linear_activation = torch.ops.handgrad.linear_activation.default
_linear_activation_backward = torch.ops.handgrad.linear_activation_backward.default
_activation = torch.ops.handgrad.activation.default
_activation_backward = torch.ops.handgrad.activation_backward.default
_bias_activation_backward = torch.ops.handgrad.bias_activation_backward.default


class _Function(torch.autograd.Function):
    # torch.func transforms (vmap, jacrev, ...) run forward, backward and jvp through the
    # ops' own vmap rules (_vmap.py).
    generate_vmap_rule = True


# What the C++ autograd kernels use too, written once in csrc (shapes.h, activation.h, ops.h):
# (*, n) as a (rows, n) matrix; whether a' is read off f; a'' and d(a')/d(out_or_f); f = beta + Omega h.
_as_matrix = _C.as_matrix
_derivative_needs_preactivation = _C.derivative_needs_preactivation
_has_second_derivative = _C.has_second_derivative
_derivative_of_derivative = _C.derivative_of_derivative
_preactivation = _C.preactivation

# An activation's parameters as the ops take them, after the activation's name:
# (negative_slope, beta, threshold), torch.nn's defaults where the activation has none.
DEFAULT_PARAMETERS = (0.01, 1.0, 20.0)


def leaky_relu_parameters(negative_slope=0.01):
    return (negative_slope, 1.0, 20.0)


def softplus_parameters(beta=1.0, threshold=20.0):
    return (0.01, beta, threshold)


# --- dl/df = dl/d(out) * a'[f] as Functions of their own: a differentiable backward ---


def _grads_of_activation_backward(ctx, grad_grad_pre):
    """Gradients of grad_pre = grad_output * a'(out_or_f) w.r.t. grad_output and out_or_f.
    Mirrors grads_of_activation_backward (csrc/autograd/activation.cpp); test_func.py checks
    that the two keep the same tensors."""
    grad_output, out_or_f = ctx.saved_tensors
    grad_grad_output = grad_out_or_f = None
    if ctx.needs_input_grad[0]:
        grad_grad_output = _ActivationBackward.apply(grad_grad_pre, out_or_f, ctx.activation, *ctx.parameters)
    if ctx.needs_input_grad[1] and _has_second_derivative(ctx.activation):
        # ReLU and LeakyReLU have a'' = 0 almost everywhere: nothing flows back through out_or_f.
        grad_out_or_f = grad_grad_pre * grad_output * _derivative_of_derivative(
            ctx.activation, out_or_f, *ctx.parameters)
    return grad_grad_output, grad_out_or_f, None, None, None, None


def _activation_grad(grad_output, out_or_f, activation, parameters):
    """dl/df, through a differentiable Function only when the backward is itself recorded."""
    if torch.is_grad_enabled():
        return _ActivationBackward.apply(grad_output, out_or_f, activation, *parameters)
    return _activation_backward(grad_output, out_or_f, activation, *parameters)


class _ActivationBackward(_Function):
    """grad_pre = grad_output * a'(out_or_f). The activation's parameters come one by one (as
    the ops take them): torch.func would flatten a tuple into its leaves."""

    @staticmethod
    def forward(grad_output, out_or_f, activation, negative_slope, beta, threshold):
        return _activation_backward(grad_output, out_or_f, activation, negative_slope, beta, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, out_or_f, ctx.activation = inputs[:3]
        ctx.parameters = inputs[3:]
        ctx.save_for_backward(grad_output, out_or_f)
        ctx.save_for_forward(grad_output, out_or_f)

    @staticmethod
    def backward(ctx, grad_grad_pre):
        return _grads_of_activation_backward(ctx, grad_grad_pre)

    @staticmethod
    def jvp(ctx, grad_output_tangent, out_or_f_tangent, *_):
        # Linear in grad_output; sigmoid's and tanh's also depend on out_or_f.
        grad_output, out_or_f = ctx.saved_tensors
        tangent = torch.zeros_like(out_or_f)
        if grad_output_tangent is not None:
            tangent = _activation_grad(grad_output_tangent, out_or_f, ctx.activation, ctx.parameters)
        if out_or_f_tangent is not None and _has_second_derivative(ctx.activation):
            second = _derivative_of_derivative(ctx.activation, out_or_f, *ctx.parameters)
            tangent = tangent + grad_output * second * out_or_f_tangent
        return tangent


class _BiasActivationBackward(_ActivationBackward):
    """(grad_pre, grad_bias): grad_pre as above, and its sum over all leading dimensions."""

    @staticmethod
    def forward(grad_output, out_or_f, activation, negative_slope, beta, threshold):
        return _bias_activation_backward(grad_output, out_or_f, activation, negative_slope, beta, threshold)

    @staticmethod
    def backward(ctx, grad_grad_pre, grad_grad_bias):
        # grad_bias sums grad_pre over the rows, so its gradient reaches every row. Mirrors
        # BiasActivationBackwardFunction::backward (csrc/autograd/activation.cpp).
        if grad_grad_bias is not None:  # (None only where the op's autograd is called)
            grad_grad_pre = grad_grad_bias if grad_grad_pre is None else grad_grad_pre + grad_grad_bias
        return _grads_of_activation_backward(ctx, grad_grad_pre)

    @staticmethod
    def jvp(ctx, grad_output_tangent, out_or_f_tangent, *_):
        tangent = _ActivationBackward.jvp(ctx, grad_output_tangent, out_or_f_tangent)
        return tangent, _as_matrix(tangent).sum(0)


# --- The fused layers: out = a[beta + Omega h] ---


def _setup_linear(ctx, inputs, output, activation, parameters):
    input, weight, bias = inputs[:3]
    ctx.activation, ctx.parameters = activation, parameters
    ctx.num_inputs = len(inputs)
    # a' is read off the output, or off f recomputed from the input, weight and bias (kept
    # only then); the output is kept only where it is read, as LinearActivationBackward0
    # (csrc/autograd/linear_activation.cpp) keeps them; test_func.py checks that both agree.
    if _derivative_needs_preactivation(activation, *parameters):
        output = None
    else:
        bias = None
    ctx.save_for_backward(input, weight, bias, output)
    ctx.save_for_forward(input, weight, bias, output)


def _out_or_f(ctx, input, weight, bias, output):
    """The tensor a'[f] is read off: out, or a recomputed f where out hides the sign."""
    if not _derivative_needs_preactivation(ctx.activation, *ctx.parameters):
        return output
    if _has_second_derivative(ctx.activation):
        # SiLU's, GELU's and softplus's a' vary with f: f with its history and tangents, by ATen's linear.
        return torch.nn.functional.linear(input, weight, bias)
    # Detached, as f only selects a' (a'' = 0), so no tangent either.
    bias = None if bias is None else bias.detach()
    return _preactivation(input.detach(), weight.detach(), bias)


class _LinearActivationFunction(_Function):
    """Backward and jvp shared by the fused layers; subclasses give forward and setup_context."""

    @staticmethod
    def backward(ctx, grad_output):
        # Mirrors LinearActivationBackward0::apply (csrc/autograd/linear_activation.cpp).
        input, weight, bias, output = ctx.saved_tensors
        out_or_f = _out_or_f(ctx, input, weight, bias, output)
        output_mask = ctx.needs_input_grad[:3]
        not_inputs = (None,) * (ctx.num_inputs - 3)
        if not torch.is_grad_enabled():
            # A plain backward (no create_graph): the whole of it in one fused op.
            return _linear_activation_backward(
                grad_output, input, weight, out_or_f, ctx.activation, ctx.parameters[0], output_mask,
                *ctx.parameters[1:]
            ) + not_inputs
        need_input, need_weight, need_bias = output_mask
        grad_input = grad_weight = grad_bias = None
        if need_bias:
            grad_pre, grad_bias = _BiasActivationBackward.apply(
                grad_output, out_or_f, ctx.activation, *ctx.parameters
            )
        else:
            grad_pre = _ActivationBackward.apply(grad_output, out_or_f, ctx.activation, *ctx.parameters)
        if need_input:
            grad_input = grad_pre.matmul(weight)  # dl/dh = Omega^T dl/df  (7.6)
        if need_weight:
            grad_weight = _as_matrix(grad_pre).t().mm(_as_matrix(input))  # dl/dOmega (7.9)
        return (grad_input, grad_weight, grad_bias) + not_inputs

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent, *_):
        input, weight, bias, output = ctx.saved_tensors
        out_or_f = _out_or_f(ctx, input, weight, bias, output)
        # df = dh Omega^T + h dOmega^T + dbeta, then d(out) = a'[f] df.
        tangent_pre = input.new_zeros((*input.shape[:-1], weight.shape[0]))
        if input_tangent is not None:
            tangent_pre = tangent_pre + input_tangent.matmul(weight.t())
        if weight_tangent is not None:
            tangent_pre = tangent_pre + input.matmul(weight_tangent.t())
        if bias_tangent is not None:
            tangent_pre = tangent_pre + bias_tangent
        return _activation_grad(tangent_pre, out_or_f, ctx.activation, ctx.parameters)


class LinearLeakyReLUFunction(_LinearActivationFunction):
    """leaky_relu(input @ weight.T + bias, negative_slope)."""

    @staticmethod
    def forward(input, weight, bias=None, negative_slope=0.01):
        return _linear_activation(input, weight, bias, "leaky_relu", *leaky_relu_parameters(negative_slope))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_linear(ctx, inputs, output, "leaky_relu", leaky_relu_parameters(*inputs[3:]))


class LinearSoftplusFunction(_LinearActivationFunction):
    """softplus(input @ weight.T + bias, beta, threshold)."""

    @staticmethod
    def forward(input, weight, bias=None, beta=1.0, threshold=20.0):
        return _linear_activation(input, weight, bias, "softplus", *softplus_parameters(beta, threshold))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_linear(ctx, inputs, output, "softplus", softplus_parameters(*inputs[3:]))


# --- The standalone activations: out = a[input] ---


def _setup_activation(ctx, inputs, output, activation, parameters):
    ctx.activation, ctx.parameters = activation, parameters
    ctx.num_inputs = len(inputs)
    # As ActivationBackward0 (csrc/autograd/activation.cpp) keeps it (checked by test_func.py).
    out_or_f = inputs[0] if _derivative_needs_preactivation(activation, *parameters) else output
    ctx.save_for_backward(out_or_f)
    ctx.save_for_forward(out_or_f)


class _ActivationFunction(_Function):
    """Backward and jvp shared by the standalone activations."""

    @staticmethod
    def backward(ctx, grad_output):
        (out_or_f,) = ctx.saved_tensors
        grad_input = _activation_grad(grad_output, out_or_f, ctx.activation, ctx.parameters)
        return (grad_input,) + (None,) * (ctx.num_inputs - 1)

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (out_or_f,) = ctx.saved_tensors
        return _activation_grad(input_tangent, out_or_f, ctx.activation, ctx.parameters)


class LeakyReLUFunction(_ActivationFunction):
    """leaky_relu(input, negative_slope)."""

    @staticmethod
    def forward(input, negative_slope=0.01):
        return _activation(input, "leaky_relu", *leaky_relu_parameters(negative_slope))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_activation(ctx, inputs, output, "leaky_relu", leaky_relu_parameters(*inputs[1:]))


class SoftplusFunction(_ActivationFunction):
    """softplus(input, beta, threshold)."""

    @staticmethod
    def forward(input, beta=1.0, threshold=20.0):
        return _activation(input, "softplus", *softplus_parameters(beta, threshold))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_activation(ctx, inputs, output, "softplus", softplus_parameters(*inputs[1:]))


def _functions_of(activation, stem, formula):
    """The fused layer's and the standalone activation's Functions of an activation without a
    parameter: Linear<stem>Function (the fused layer) and <stem>Function (elementwise). Made
    by type(), so that each has its name from the start (autograd names the grad_fn by it)."""

    def linear_forward(input, weight, bias=None):
        return _linear_activation(input, weight, bias, activation, *DEFAULT_PARAMETERS)

    def linear_setup_context(ctx, inputs, output):
        _setup_linear(ctx, inputs, output, activation, DEFAULT_PARAMETERS)

    def forward(input):
        return _activation(input, activation, *DEFAULT_PARAMETERS)

    def setup_context(ctx, inputs, output):
        _setup_activation(ctx, inputs, output, activation, DEFAULT_PARAMETERS)

    def made(name, base, doc, forward, setup_context):
        return type(name, (base,), {"__doc__": doc, "__module__": __name__, "forward": staticmethod(forward),
                                    "setup_context": staticmethod(setup_context)})

    return (made(f"Linear{stem}Function", _LinearActivationFunction, f"{formula} of input @ weight.T + bias.",
                 linear_forward, linear_setup_context),
            made(f"{stem}Function", _ActivationFunction, f"{formula} of input, elementwise.", forward,
                 setup_context))


LinearReLUFunction, ReLUFunction = _functions_of("relu", "ReLU", "relu")
LinearSigmoidFunction, SigmoidFunction = _functions_of("sigmoid", "Sigmoid", "sigmoid")
LinearTanhFunction, TanhFunction = _functions_of("tanh", "Tanh", "tanh")
LinearSiLUFunction, SiLUFunction = _functions_of("silu", "SiLU", "silu")
LinearGELUFunction, GELUFunction = _functions_of("gelu", "GELU", "gelu")
LinearGELUTanhFunction, GELUTanhFunction = _functions_of("gelu_tanh", "GELUTanh", "GELU's tanh approximation")


__all__ = [
    "LinearReLUFunction",
    "LinearLeakyReLUFunction",
    "LinearSigmoidFunction",
    "LinearTanhFunction",
    "ReLUFunction",
    "LeakyReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "LinearSiLUFunction",
    "LinearGELUFunction",
    "LinearGELUTanhFunction",
    "SiLUFunction",
    "GELUFunction",
    "GELUTanhFunction",
    "LinearSoftplusFunction",
    "SoftplusFunction",
]
