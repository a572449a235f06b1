"""Functional API: the same results, shapes and dtypes as act(F.linear(input, weight, bias)).

input has shape (*, in_features), weight (out_features, in_features), bias (out_features,)
or None. Tensor arguments are checked by the ops themselves (csrc/checks.h), before any
kernel runs; negative_slope is checked here.
"""

import math
import numbers

import torch

from .autograd import (
    LeakyReLUFunction,
    LinearLeakyReLUFunction,
    LinearReLUFunction,
    LinearSigmoidFunction,
    ReLUFunction,
    SigmoidFunction,
)


def check_negative_slope(negative_slope):
    """Return negative_slope as a float, or raise if it is not a finite real number."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(
            f"negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope}")
    return float(negative_slope)


def _apply(function, *args):
    # Dynamo cannot trace a Function that defines jvp (forward-mode AD). While compiling we
    # call its forward, i.e. the op itself, whose registered autograd is the same backward.
    if torch.compiler.is_compiling():
        return function.forward(*args)
    return function.apply(*args)


def _autocast(input, weight, bias):
    """Under torch.autocast, cast as autocast casts nn.Linear's arguments: to its dtype.

    The casts are ordinary differentiable ops, so gradients reach the original tensors in
    their own dtype, exactly as with nn.Linear.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    device_type = input.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() else t for t in (input, weight, bias)
    )


def linear_relu(input, weight, bias=None):
    """relu(input @ weight.T + bias)."""
    return _apply(LinearReLUFunction, *_autocast(input, weight, bias))


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.01):
    """leaky_relu(input @ weight.T + bias, negative_slope), for any finite slope."""
    negative_slope = check_negative_slope(negative_slope)
    return _apply(LinearLeakyReLUFunction, *_autocast(input, weight, bias), negative_slope)


def linear_sigmoid(input, weight, bias=None):
    """sigmoid(input @ weight.T + bias)."""
    return _apply(LinearSigmoidFunction, *_autocast(input, weight, bias))


def relu(input):
    """relu(input), elementwise."""
    return _apply(ReLUFunction, input)


def leaky_relu(input, negative_slope=0.01):
    """leaky_relu(input, negative_slope), elementwise, for any finite slope."""
    return _apply(LeakyReLUFunction, input, check_negative_slope(negative_slope))


def sigmoid(input):
    """sigmoid(input), elementwise."""
    return _apply(SigmoidFunction, input)


__all__ = [
    "linear_relu",
    "linear_leaky_relu",
    "linear_sigmoid",
    "relu",
    "leaky_relu",
    "sigmoid",
]
