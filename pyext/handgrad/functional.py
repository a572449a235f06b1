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


def linear_relu(input, weight, bias=None):
    """relu(input @ weight.T + bias)."""
    return _apply(LinearReLUFunction, input, weight, bias)


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.01):
    """leaky_relu(input @ weight.T + bias, negative_slope), for any finite slope."""
    return _apply(LinearLeakyReLUFunction, input, weight, bias, check_negative_slope(negative_slope))


def linear_sigmoid(input, weight, bias=None):
    """sigmoid(input @ weight.T + bias)."""
    return _apply(LinearSigmoidFunction, input, weight, bias)


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
