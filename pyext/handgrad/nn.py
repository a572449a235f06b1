"""Drop-in modules: fused Linear+activation layers, standalone activations, and fuse().

The fused layers are nn.Linear subclasses: the same constructor, parameters (`weight`,
`bias`), initialisation, state_dict and repr, with the activation applied in the same
kernel as the bias.
"""

import torch
from torch import nn

from . import functional as F


class LinearReLU(nn.Linear):
    """relu(input @ weight.T + bias), initialised exactly as nn.Linear."""

    def forward(self, input):
        return F.linear_relu(input, self.weight, self.bias)


class LinearLeakyReLU(nn.Linear):
    """leaky_relu(input @ weight.T + bias, negative_slope), initialised exactly as nn.Linear."""

    def __init__(self, in_features, out_features, bias=True, negative_slope=0.01, device=None,
                 dtype=None):
        negative_slope = F.check_negative_slope(negative_slope)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.negative_slope = negative_slope

    def forward(self, input):
        return F.linear_leaky_relu(input, self.weight, self.bias, self.negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"


class LinearSigmoid(nn.Linear):
    """sigmoid(input @ weight.T + bias), initialised exactly as nn.Linear."""

    def forward(self, input):
        return F.linear_sigmoid(input, self.weight, self.bias)


class ReLU(nn.Module):
    """relu(input), elementwise."""

    def forward(self, input):
        return F.relu(input)


class LeakyReLU(nn.Module):
    """leaky_relu(input, negative_slope), elementwise."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = F.check_negative_slope(negative_slope)

    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(nn.Module):
    """sigmoid(input), elementwise."""

    def forward(self, input):
        return F.sigmoid(input)


def _fused_layer(linear, activation):
    """The fused module for linear followed by activation, or None if they do not fuse."""
    if type(linear) is not nn.Linear:  # subclasses (ours included) may change forward
        return None
    if type(activation) in (nn.ReLU, ReLU):
        fused_type, extra = LinearReLU, {}
    elif type(activation) in (nn.LeakyReLU, LeakyReLU):
        fused_type, extra = LinearLeakyReLU, {"negative_slope": activation.negative_slope}
    elif type(activation) in (nn.Sigmoid, Sigmoid):
        fused_type, extra = LinearSigmoid, {}
    else:
        return None
    # Built on the meta device, so nothing is allocated or initialised, then given the
    # linear layer's own parameters.
    fused = fused_type(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       device="meta", **extra)
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def fuse(module):
    """Fuse every nn.Linear directly followed by ReLU, LeakyReLU or Sigmoid in an nn.Sequential.

    Works in place, through nested modules, and returns `module`. The fused layer takes the
    Linear's place and shares its parameters; the activation is replaced by nn.Identity, so
    the positions and state_dict keys of the model do not change.
    """
    if isinstance(module, nn.Sequential):
        for index in range(len(module) - 1):
            fused = _fused_layer(module[index], module[index + 1])
            if fused is not None:
                module[index] = fused
                module[index + 1] = nn.Identity()
    for child in module.children():
        fuse(child)
    return module


__all__ = [
    "LinearReLU",
    "LinearLeakyReLU",
    "LinearSigmoid",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "fuse",
]
