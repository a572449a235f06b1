"""handgrad's forward ops as torch's own ops, for an exported program bound for a runtime
that has only torch's (ONNX, ExecuTorch): the same computation, unfused.

    program = torch.export.export(model, (x,))
    table = torch.export.default_decompositions()
    table.update(handgrad.decompositions())
    program = program.run_decompositions(table)  # no handgrad op left

Each activation is torch's own (functional._torch_activation, the one place that names them).
"""

import torch
import torch.nn.functional as F

from . import functional as HF


def _activation(input, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    return HF._torch_activation(input, activation, (negative_slope, beta, threshold))


def _activation_in_place(input, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    input.copy_(_activation(input, activation, negative_slope, beta, threshold))


def _linear_activation(input, weight, bias, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    return _activation(F.linear(input, weight, bias), activation, negative_slope, beta, threshold)


def _mlp(input, weights, biases, activation, negative_slope=0.01, checkpoint_every=0,
         output_activation=None, beta=1.0, threshold=20.0):
    h = input
    for layer, weight in enumerate(weights):
        h = F.linear(h, weight, biases[layer] if biases else None)
        current = activation if layer + 1 < len(weights) else output_activation
        if current is not None:
            h = _activation(h, current, negative_slope, beta, threshold)
    return h  # (checkpointing changes what the backward stores, not the output)


def decompositions():
    """{op: its decomposition} for handgrad's forward ops (linear_activation, activation and
    its in-place form, mlp), to add to a table for ExportedProgram.run_decompositions."""
    ops = torch.ops.handgrad
    return {ops.linear_activation.default: _linear_activation, ops.activation.default: _activation,
            ops.activation_.default: _activation_in_place, ops.mlp.default: _mlp}
