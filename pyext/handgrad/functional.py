"""Functional API: the same results, shapes and dtypes as act(F.linear(input, weight, bias)).

input has shape (*, in_features), weight (out_features, in_features), bias (out_features,)
or None. Tensor arguments are checked by the ops themselves (csrc/checks.h), before any
kernel runs; negative_slope is checked here.
"""

import math
import numbers

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


def linear_relu(input, weight, bias=None):
    """relu(input @ weight.T + bias)."""
    return LinearReLUFunction.apply(input, weight, bias)


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.01):
    """leaky_relu(input @ weight.T + bias, negative_slope), for any finite slope."""
    return LinearLeakyReLUFunction.apply(input, weight, bias, check_negative_slope(negative_slope))


def linear_sigmoid(input, weight, bias=None):
    """sigmoid(input @ weight.T + bias)."""
    return LinearSigmoidFunction.apply(input, weight, bias)


def relu(input):
    """relu(input), elementwise."""
    return ReLUFunction.apply(input)


def leaky_relu(input, negative_slope=0.01):
    """leaky_relu(input, negative_slope), elementwise, for any finite slope."""
    return LeakyReLUFunction.apply(input, check_negative_slope(negative_slope))


def sigmoid(input):
    """sigmoid(input), elementwise."""
    return SigmoidFunction.apply(input)


__all__ = [
    "linear_relu",
    "linear_leaky_relu",
    "linear_sigmoid",
    "relu",
    "leaky_relu",
    "sigmoid",
]
