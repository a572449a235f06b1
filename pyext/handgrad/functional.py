"""Functional API: the same results, shapes and dtypes as act(F.linear(input, weight, bias)),
through handgrad's kernels in float32, float64, bfloat16 and float16 and through torch's own
ops in the other dtypes torch takes (integers, bool, complex).

input has shape (*, in_features), weight (out_features, in_features), bias (out_features,)
or None. Tensor arguments are checked by the ops themselves (csrc/checks.h), before any
kernel runs; the activations' parameters (negative_slope, beta, threshold) are checked here
too, where a Python type error can be named.

Each function calls its torch.ops.handgrad op, whose C++ autograd kernel records the
backward and whose autocast kernel casts as autocast casts nn.Linear. In eager mode the op
is called through handgrad._C, which reaches the same op through the dispatcher faster
than torch.ops's argument parsing; while torch.compile traces, through torch.ops, which
Dynamo records. Forward-mode AD and torch.func transforms, which the C++ autograd API does
not support, go to the Python Functions of handgrad.autograd: the same ops, the same
formulas. Under torch.jit.script, which compiles only the branch it takes, each function
calls its op directly; the op checks its arguments as in eager mode.
"""

import functools
import math
import numbers
from typing import Optional

import torch
from torch import Tensor
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
    LinearSoftplusFunction,
    SoftplusFunction,
    DEFAULT_PARAMETERS,
    leaky_relu_parameters,
    softplus_parameters,
)

_ops = torch.ops.handgrad


def _real(name, value):
    if isinstance(value, Tensor) and value.dim() == 0 and not (value.is_complex() or value.dtype == torch.bool):
        return float(value)  # a 0-D tensor, as torch's Scalar arguments take one
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_negative_slope(negative_slope):
    """Return negative_slope as a float, or raise if it is not a finite real number."""
    negative_slope = _real("negative_slope", negative_slope)
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope}")
    return negative_slope


def check_softplus(beta, threshold):
    """Return softplus's (beta, threshold) as floats, or raise if beta is not a positive
    finite number or threshold is not a number (infinite thresholds are allowed)."""
    beta, threshold = _real("beta", beta), _real("threshold", threshold)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta:g}")  # as the ops write it
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan")
    return beta, threshold


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
    """For the Python Functions, the casts the ops' autocast kernels make (csrc/autocast.cpp):
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
_LINEAR_AUTOGRAD_FUNCTIONS = {"relu": LinearReLUFunction, "leaky_relu": LinearLeakyReLUFunction,
                     "sigmoid": LinearSigmoidFunction, "tanh": LinearTanhFunction,
                     "silu": LinearSiLUFunction, "gelu": LinearGELUFunction,
                     "gelu_tanh": LinearGELUTanhFunction, "softplus": LinearSoftplusFunction}
_FUNCTIONS = {"relu": ReLUFunction, "leaky_relu": LeakyReLUFunction, "sigmoid": SigmoidFunction,
              "tanh": TanhFunction, "silu": SiLUFunction, "gelu": GELUFunction, "gelu_tanh": GELUTanhFunction,
              "softplus": SoftplusFunction}


def gelu_activation(approximate: str) -> str:
    """The activation name of GELU with `approximate` as torch.nn.GELU takes it: "none"
    (x Phi[x], with erf) is "gelu", "tanh" is "gelu_tanh"; anything else is refused.
    TorchScript compiles it too, which knows no !r."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"approximate must be 'none' or 'tanh', got '{approximate}'")


def _function_arguments(activation, parameters):
    """The Python Function's arguments after the tensors: the activation's own parameters."""
    if activation == "leaky_relu":
        return parameters[:1]
    return parameters[1:] if activation == "softplus" else ()


def parameters_of(activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    """The parameters (negative_slope, beta, threshold) as the ops take them, checked: those
    the activation takes, the defaults for the others."""
    if activation == "leaky_relu":
        return leaky_relu_parameters(check_negative_slope(negative_slope))
    if activation == "softplus":
        return softplus_parameters(*check_softplus(beta, threshold))
    return DEFAULT_PARAMETERS


# The dtypes handgrad's kernels take. For any other (integers, bool, complex), and for what
# else F.linear takes and the kernels do not (a 1-D weight, a bias that is not 1-D but
# broadcasts to the output), the functions and modules compute what torch computes,
# with torch's own ops: F.relu of integers, a complex Linear+Tanh, a bias of shape
# (1, out_features), and F.linear's own error for a call it refuses. torch.ops.handgrad
# refuses them all.
_KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_FLOAT32 = torch.float32


def _kernels_take(input, weight=None, bias=None):
    """Whether the kernels take the call, or refuse it with their own message: input's dtype
    is one of theirs and, for a layer, weight is not 1-D and bias does not broadcast to
    another shape (anything that is no tensor goes on to the op, whose error names the
    argument)."""
    if getattr(input, "dtype", _FLOAT32) not in _KERNEL_DTYPES or getattr(weight, "ndim", 2) == 1:
        return False
    if not isinstance(bias, Tensor) or not isinstance(weight, Tensor) or weight.ndim != 2:
        return True
    return bias.ndim == 1 and (bias.shape[0] != 1 or weight.shape[0] == 1)


def _torch_activation(input, activation, parameters, inplace=False):
    """torch's own activation, for the calls the kernels do not take."""
    F = torch.nn.functional
    negative_slope, beta, threshold = parameters
    if activation == "relu":
        return F.relu(input, inplace)
    if activation == "leaky_relu":
        return F.leaky_relu(input, negative_slope, inplace)
    if activation == "silu":
        return F.silu(input, inplace)
    if activation == "sigmoid":
        return torch.sigmoid(input)
    if activation == "tanh":
        return torch.tanh(input)
    if activation == "softplus":
        return F.softplus(input, beta, threshold)
    return F.gelu(input, approximate="tanh" if activation == "gelu_tanh" else "none")


# In eager mode a call the kernels do not take is found where the op refuses it (before any
# work), at no cost to the calls they take; traced or transformed calls ask first.


def _linear(input, weight, bias, activation, parameters=DEFAULT_PARAMETERS):
    ops = _op_namespace()
    if ops is _C or _kernels_take(input, weight, bias):
        if ops is None:
            arguments = _autocast(input, weight, bias) + _function_arguments(activation, parameters)
            return _LINEAR_AUTOGRAD_FUNCTIONS[activation].apply(*arguments)
        try:
            return ops.linear_activation(input, weight, bias, activation, *parameters)
        except (TypeError, NotImplementedError):
            _explain_bad_argument(f"linear_{activation}", input=input, weight=weight, bias=bias)
            raise
        except RuntimeError:
            if _kernels_take(input, weight, bias):
                raise
    return _torch_activation(torch.nn.functional.linear(input, weight, bias), activation, parameters)


def linear_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """relu(input @ weight.T + bias)."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch only: the op itself
        return torch.ops.handgrad.linear_activation(input, weight, bias, "relu")
    if has_torch_function((input, weight, bias)):  # torch.fx proxies, tensor subclasses
        return handle_torch_function(linear_relu, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "relu")


def linear_leaky_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      negative_slope: float = 0.01) -> Tensor:
    """leaky_relu(input @ weight.T + bias, negative_slope), for any finite slope."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.linear_activation(input, weight, bias, "leaky_relu", negative_slope)
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_leaky_relu, (input, weight, bias), input, weight, bias,
                                     negative_slope=negative_slope)
    return _linear(input, weight, bias, "leaky_relu", parameters_of("leaky_relu", negative_slope))


def linear_sigmoid(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """sigmoid(input @ weight.T + bias)."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.linear_activation(input, weight, bias, "sigmoid")
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_sigmoid, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "sigmoid")


def linear_tanh(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """tanh(input @ weight.T + bias)."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.linear_activation(input, weight, bias, "tanh")
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_tanh, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "tanh")


def linear_silu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """silu(input @ weight.T + bias): x sigmoid(x) of the layer's pre-activation."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.linear_activation(input, weight, bias, "silu")
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_silu, (input, weight, bias), input, weight, bias)
    return _linear(input, weight, bias, "silu")


def linear_gelu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                approximate: str = "none") -> Tensor:
    """gelu(input @ weight.T + bias, approximate), approximate "none" or "tanh" as F.gelu."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.linear_activation(input, weight, bias, gelu_activation(approximate))
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_gelu, (input, weight, bias), input, weight, bias,
                                     approximate=approximate)
    return _linear(input, weight, bias, gelu_activation(approximate))


def linear_softplus(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, beta: float = 1.0,
                    threshold: float = 20.0) -> Tensor:
    """softplus(input @ weight.T + bias, beta, threshold): log(1 + exp(beta f)) / beta, and f
    itself where beta f > threshold, as F.softplus."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.linear_activation(input, weight, bias, "softplus", 0.01, beta, threshold)
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear_softplus, (input, weight, bias), input, weight, bias,
                                     beta=beta, threshold=threshold)
    return _linear(input, weight, bias, "softplus", parameters_of("softplus", beta=beta, threshold=threshold))


def _elementwise(input, activation, parameters=DEFAULT_PARAMETERS, inplace=False):
    ops = _op_namespace()
    if ops is _C or _kernels_take(input):
        if ops is None:
            out = _FUNCTIONS[activation].apply(input, *_function_arguments(activation, parameters))
            return input.copy_(out) if inplace else out
        try:
            if inplace:
                if torch.compiler.is_exporting():
                    # As torch's own in-place ops export: the op, then a copy that export
                    # makes functional, so that an exported program holds no mutating op.
                    return input.copy_(ops.activation(input, activation, *parameters))
                ops.activation_(input, activation, *parameters)
                return input
            return ops.activation(input, activation, *parameters)
        except (TypeError, NotImplementedError):
            _explain_bad_argument(activation, input=input)
            raise
        except RuntimeError:
            if _kernels_take(input):
                raise
    return _torch_activation(input, activation, parameters, inplace)


def _scripted_activation(input: Tensor, activation: str, inplace: bool, negative_slope: float = 0.01) -> Tensor:
    """The elementwise functions under TorchScript: the op, in place or not."""
    if inplace:
        torch.ops.handgrad.activation_(input, activation, negative_slope)
        return input
    return torch.ops.handgrad.activation(input, activation, negative_slope)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """relu(input), elementwise; with inplace=True it overwrites input and returns it."""
    if torch.jit.is_scripting():
        return _scripted_activation(input, "relu", inplace)
    if has_torch_function((input,)):
        return handle_torch_function(relu, (input,), input, inplace=inplace)
    return _elementwise(input, "relu", inplace=inplace)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """leaky_relu(input, negative_slope), elementwise, for any finite slope; with
    inplace=True it overwrites input and returns it."""
    if torch.jit.is_scripting():
        return _scripted_activation(input, "leaky_relu", inplace, negative_slope)
    if has_torch_function((input,)):
        return handle_torch_function(leaky_relu, (input,), input, negative_slope=negative_slope,
                                     inplace=inplace)
    return _elementwise(input, "leaky_relu", parameters_of("leaky_relu", negative_slope), inplace)


def sigmoid(input: Tensor) -> Tensor:
    """sigmoid(input), elementwise."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.activation(input, "sigmoid")
    if has_torch_function((input,)):
        return handle_torch_function(sigmoid, (input,), input)
    return _elementwise(input, "sigmoid")


def tanh(input: Tensor) -> Tensor:
    """tanh(input), elementwise."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.activation(input, "tanh")
    if has_torch_function((input,)):
        return handle_torch_function(tanh, (input,), input)
    return _elementwise(input, "tanh")


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """silu(input) = input * sigmoid(input), elementwise; the signature of F.silu."""
    if torch.jit.is_scripting():
        return _scripted_activation(input, "silu", inplace)
    if has_torch_function((input,)):
        return handle_torch_function(silu, (input,), input, inplace=inplace)
    return _elementwise(input, "silu", inplace=inplace)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """gelu(input), elementwise: input * Phi(input), or its tanh approximation; as F.gelu."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.activation(input, gelu_activation(approximate))
    if has_torch_function((input,)):
        return handle_torch_function(gelu, (input,), input, approximate=approximate)
    return _elementwise(input, gelu_activation(approximate))


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """softplus(input, beta, threshold), elementwise; the signature of F.softplus."""
    if torch.jit.is_scripting():
        return torch.ops.handgrad.activation(input, "softplus", 0.01, beta, threshold)
    if has_torch_function((input,)):
        return handle_torch_function(softplus, (input,), input, beta=beta, threshold=threshold)
    return _elementwise(input, "softplus", parameters_of("softplus", beta=beta, threshold=threshold))


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
    if output_activation is not None and output_activation not in _LINEAR_AUTOGRAD_FUNCTIONS:
        raise ValueError("output_activation must be None, 'relu', 'leaky_relu', 'sigmoid', 'tanh', "
                         f"'silu', 'gelu', 'gelu_tanh' or 'softplus', got {output_activation!r}")
    return output_activation


def mlp(input, weights, biases=None, activation="relu", negative_slope=0.01,
        checkpoint_every=None, output_activation=None, *, beta=1.0, threshold=20.0):
    """A whole network in one op: hidden layers h = activation(h @ W.T + b), then the output
    layer h @ W.T + b, followed by output_activation if one is given (any of the activations:
    "relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh", "softplus"). Both
    activations take the same parameters: negative_slope for leaky_relu, beta and threshold
    for softplus.
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
                                     output_activation=output_activation, beta=beta, threshold=threshold)
    # All three checked, whichever activations the network has, as the op and MLP check them.
    parameters = (check_negative_slope(negative_slope), *check_softplus(beta, threshold))
    return _mlp(input, list(weights), biases, activation, parameters,
                check_checkpoint_every(checkpoint_every), check_output_activation(output_activation))


def _layer_by_layer(input, layers, output_activation, parameters):
    """The network one layer at a time, where the one op does not run it (forward-mode AD and
    torch.func here; hooks or wrapped layers in handgrad.nn.MLP): each call of `layers` in
    turn (the hidden layers' give their activation's output, the output layer's its
    product), then output_activation, if any."""
    for layer in layers:
        input = layer(input)
    return input if output_activation is None else _elementwise(input, output_activation, parameters)


def _mlp(input, weights, biases, activation, parameters, checkpoint_every, output_activation=None):
    """mlp() with its arguments checked already (handgrad.nn.MLP checks them once)."""
    ops = _op_namespace()
    kernels_take = _kernels_take(input)
    if ops is None or not kernels_take:  # layer by layer, through the per-layer Python Functions
        if kernels_take:  # the op's own check, and its messages
            _C.check_mlp(input, weights, biases, activation, parameters[0], checkpoint_every,
                         output_activation, *parameters[1:])
        elif not weights or len(biases) not in (0, len(weights)):
            # The op's message for the lists (a float input passes its dtype check); the
            # layers' shapes and dtypes are F.linear's to check.
            _C.check_mlp(torch.empty(0), weights, biases, activation, parameters[0], checkpoint_every,
                         output_activation, *parameters[1:])
        layer_biases = biases if biases else [None] * len(weights)
        layers = [functools.partial(_linear, weight=weight, bias=bias, activation=activation, parameters=parameters)
                  for weight, bias in zip(weights[:-1], layer_biases[:-1])]
        layers.append(functools.partial(torch.nn.functional.linear, weight=weights[-1], bias=layer_biases[-1]))
        return _layer_by_layer(input, layers, output_activation, parameters)
    try:
        return ops.mlp(input, weights, biases, activation, parameters[0], checkpoint_every,
                       output_activation, *parameters[1:])
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
    "linear_softplus",
    "softplus",
]
