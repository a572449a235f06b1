"""Functional API: the same results, shapes and dtypes as act(F.linear(input, weight, bias)).

input has shape (*, in_features), weight (out_features, in_features), bias (out_features,)
or None. Tensor arguments are checked by the ops themselves (csrc/checks.h), before any
kernel runs; negative_slope is checked here.

Each function calls its torch.ops.handgrad op, whose C++ autograd kernel records the
backward and whose autocast kernel casts as autocast casts nn.Linear. In eager mode the op
is called through handgrad._C, which reaches the same op through the dispatcher faster
than torch.ops's argument parsing; while torch.compile traces, through torch.ops, which
Dynamo records. Forward-mode AD and torch.func transforms, which the C++ autograd API does
not support, go to the Python Functions of handgrad.autograd: the same ops, the same
formulas.
"""

import math
import numbers

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.overrides import handle_torch_function, has_torch_function

from . import _C
from .autograd import (
    LeakyReLUFunction,
    LinearLeakyReLUFunction,
    LinearReLUFunction,
    LinearSigmoidFunction,
    LinearTanhFunction,
    LinearSiLUFunction,
    LinearGELUFunction,
    LinearGELUTanhFunction,
    ReLUFunction,
    SigmoidFunction,
    TanhFunction,
    SiLUFunction,
    GELUFunction,
    GELUTanhFunction,
)

_ops = torch.ops.handgrad


def check_negative_slope(negative_slope):
    """Return negative_slope as a float, or raise if it is not a finite real number."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(
            f"negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope}")
    return float(negative_slope)


def _op_namespace():
    """The namespace whose op a call goes through: torch.ops while torch.compile traces
    (Dynamo records the op); None for forward-mode AD and torch.func, which take the Python
    Functions; else handgrad._C, the same op through a cheaper call."""
    if torch.compiler.is_compiling():
        return _ops
    if _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return None
    return _C


def _explain_bad_argument(function, **arguments):
    """After a failed call: raise the error that names the argument at fault, where the
    generic one would not (pybind11 lists the accepted types; a nested tensor subclass
    names only the op)."""
    for position, (name, value) in enumerate(arguments.items(), 1):
        if value is None and name == "bias":
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{function}(): argument '{name}' (position {position}) must be "
                            f"Tensor, not {type(value).__name__}")
        if value.layout != torch.strided or value.is_nested:
            described = "is a nested tensor" if value.is_nested else f"has layout {value.layout}"
            raise NotImplementedError(f"{function}: {name} {described}; only dense (strided) "
                                      "tensors are supported")


def _autocast(input, weight, bias):
    """For the Python Functions, the casts the ops' autocast kernels make (csrc/autograd):
    under torch.autocast, floating arguments other than float64 go to the autocast dtype,
    outside the Function, so that their gradients flow back through the casts."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (input, weight, bias)
    )


# The Python Functions, by activation: the way forward-mode AD and torch.func go.
_LINEAR_FUNCTIONS = {"relu": LinearReLUFunction, "leaky_relu": LinearLeakyReLUFunction,
                     "sigmoid": LinearSigmoidFunction, "tanh": LinearTanhFunction,
                     "silu": LinearSiLUFunction, "gelu": LinearGELUFunction,
                     "gelu_tanh": LinearGELUTanhFunction}
_FUNCTIONS = {"relu": ReLUFunction, "leaky_relu": LeakyReLUFunction, "sigmoid": SigmoidFunction,
              "tanh": TanhFunction, "silu": SiLUFunction, "gelu": GELUFunction, "gelu_tanh": GELUTanhFunction}


def gelu_activation(approximate):
    """The activation name of GELU with `approximate` as torch.nn.GELU takes it: "none"
    (x Phi[x], with erf) is "gelu", "tanh" is "gelu_tanh"; anything else is refused."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def _slope_argument(activation, negative_slope):
    return (negative_slope,) if activation == "leaky_relu" else ()


def _linear(input, weight, bias, activation, negative_slope):
    ops = _op_namespace()
    if ops is None:
        arguments = _autocast(input, weight, bias) + _slope_argument(activation, negative_slope)
        return _LINEAR_FUNCTIONS[activation].apply(*arguments)
    try:
        return ops.linear_activation(input, weight, bias, activation, negative_slope)
    except (TypeError, NotImplementedError):
        _explain_bad_argument(f"linear_{activation}", input=input, weight=weight, bias=bias)
        raise


def linear_relu(input, weight, bias=None):
    """relu(input @ weight.T + bias)."""
    if has_torch_function((input, weight, bias)):  # torch.fx proxies, tensor subclasses
        return handle_torch_function(linear_relu, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "relu", 0.0)


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.01):
    """leaky_relu(input @ weight.T + bias, negative_slope), for any finite slope."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_leaky_relu, (input, weight, bias), input, weight, bias,
                                     negative_slope=negative_slope)
    negative_slope = check_negative_slope(negative_slope)
    return _linear(input, weight, bias, "leaky_relu", negative_slope)


def linear_sigmoid(input, weight, bias=None):
    """sigmoid(input @ weight.T + bias)."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_sigmoid, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "sigmoid", 0.0)


def linear_tanh(input, weight, bias=None):
    """tanh(input @ weight.T + bias)."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_tanh, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "tanh", 0.0)


def linear_silu(input, weight, bias=None):
    """silu(input @ weight.T + bias): x sigmoid(x) of the layer's pre-activation."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_silu, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "silu", 0.0)


def linear_gelu(input, weight, bias=None, approximate="none"):
    """gelu(input @ weight.T + bias, approximate), approximate "none" or "tanh" as F.gelu."""
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_gelu, (input, weight, bias), input, weight, bias,
                                     approximate=approximate)
    return _linear(input, weight, bias, gelu_activation(approximate), 0.0)


def _elementwise(input, activation, negative_slope, inplace):
    ops = _op_namespace()
    if ops is None:
        out = _FUNCTIONS[activation].apply(input, *_slope_argument(activation, negative_slope))
        return input.copy_(out) if inplace else out
    try:
        if inplace:
            ops.activation_(input, activation, negative_slope)
            return input
        return ops.activation(input, activation, negative_slope)
    except (TypeError, NotImplementedError):
        _explain_bad_argument(activation, input=input)
        raise


def relu(input, inplace=False):
    """relu(input), elementwise; with inplace=True it overwrites input and returns it."""
    if has_torch_function((input,)):
        return handle_torch_function(relu, (input,), input, inplace=inplace)
    return _elementwise(input, "relu", 0.0, inplace)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """leaky_relu(input, negative_slope), elementwise, for any finite slope; with
    inplace=True it overwrites input and returns it."""
    if has_torch_function((input,)):
        return handle_torch_function(leaky_relu, (input,), input, negative_slope=negative_slope,
                                     inplace=inplace)
    negative_slope = check_negative_slope(negative_slope)
    return _elementwise(input, "leaky_relu", negative_slope, inplace)


def sigmoid(input):
    """sigmoid(input), elementwise."""
    if has_torch_function((input,)):
        return handle_torch_function(sigmoid, (input,), input)
    return _elementwise(input, "sigmoid", 0.0, False)


def tanh(input):
    """tanh(input), elementwise."""
    if has_torch_function((input,)):
        return handle_torch_function(tanh, (input,), input)
    return _elementwise(input, "tanh", 0.0, False)


def silu(input, inplace=False):
    """silu(input) = input * sigmoid(input), elementwise; the signature of F.silu."""
    if has_torch_function((input,)):
        return handle_torch_function(silu, (input,), input, inplace=inplace)
    return _elementwise(input, "silu", 0.0, inplace)


def gelu(input, approximate="none"):
    """gelu(input), elementwise: input * Phi(input), or its tanh approximation; as F.gelu."""
    if has_torch_function((input,)):
        return handle_torch_function(gelu, (input,), input, approximate=approximate)
    return _elementwise(input, gelu_activation(approximate), 0.0, False)


def check_checkpoint_every(checkpoint_every):
    """Return checkpoint_every as the op takes it (0: none), or raise if it is not None or a
    positive integer."""
    if checkpoint_every is None:
        return 0
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}")
    return checkpoint_every


def check_activation(activation):
    """Return activation, or raise the ops' error (csrc/checks.h) if it is not one of the
    activations: for arguments checked before any tensor exists (handgrad.nn.MLP)."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string, got {type(activation).__name__}")
    _C.has_second_derivative(activation)  # parses it, or raises the ops' ValueError
    return activation


def check_output_activation(output_activation):
    """Return output_activation, or raise if it is not None or one of the activations."""
    if output_activation is not None and output_activation not in _LINEAR_FUNCTIONS:
        raise ValueError("output_activation must be None, 'relu', 'leaky_relu', 'sigmoid', 'tanh', "
                         f"'silu', 'gelu' or 'gelu_tanh', got {output_activation!r}")
    return output_activation


def mlp(input, weights, biases=None, activation="relu", negative_slope=0.01,
        checkpoint_every=None, output_activation=None):
    """A whole network in one op: hidden layers h = activation(h @ W.T + b), then the output
    layer h @ W.T + b, followed by output_activation if one is given (any of the activations:
    "relu", "leaky_relu" with the same slope, "sigmoid", "tanh", "silu", "gelu", "gelu_tanh").
    weights and biases list the layers in order, the
    output layer last; biases=None (or []) gives layers without a bias.

    The forward stores each hidden layer's output, and the backward runs layer by layer from
    the output (section 7.4 of the book). With checkpoint_every=k it stores every k-th output
    only and recomputes the layers in between during the backward (problem 7.11).
    Forward-mode AD and torch.func run the layers one by one through the Python Functions.
    """
    biases = [] if biases is None else list(biases)
    if has_torch_function((input, *weights, *biases)):
        return handle_torch_function(mlp, (input, *weights, *biases), input, weights, biases,
                                     activation=activation, negative_slope=negative_slope,
                                     checkpoint_every=checkpoint_every,
                                     output_activation=output_activation)
    return _mlp(input, list(weights), biases, activation, check_negative_slope(negative_slope),
                check_checkpoint_every(checkpoint_every), check_output_activation(output_activation))


def _mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
         output_activation=None):
    """mlp() with its arguments checked already (handgrad.nn.MLP checks them once)."""
    ops = _op_namespace()
    if ops is None:  # layer by layer, through the per-layer Python Functions
        _C.check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
                     output_activation)  # the op's own check, and its messages
        layer_biases = biases if biases else [None] * len(weights)
        h = input
        for weight, bias in zip(weights[:-1], layer_biases[:-1]):
            h = _linear(h, weight, bias, activation, negative_slope)
        if output_activation is None:
            return torch.nn.functional.linear(h, weights[-1], layer_biases[-1])
        return _linear(h, weights[-1], layer_biases[-1], output_activation, negative_slope)
    try:
        return ops.mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
                         output_activation)
    except (TypeError, NotImplementedError):
        _explain_bad_argument("mlp", input=input)
        for name, tensors in (("weights", weights), ("biases", biases)):
            _explain_bad_argument("mlp", **{f"{name}[{i}]": t for i, t in enumerate(tensors)})
        raise


__all__ = [
    "mlp",
    "linear_relu",
    "linear_leaky_relu",
    "linear_sigmoid",
    "linear_tanh",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "linear_silu",
    "linear_gelu",
    "silu",
    "gelu",
]
