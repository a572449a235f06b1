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


def _linear_activation(input, weight, bias, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    return _activation(F.linear(input, weight, bias), activation, negative_slope, beta, threshold)


def _mlp(input, weights, biases, activation, negative_slope=0.01, checkpoint_every=0,
         output_activation=None, beta=1.0, threshold=20.0):
    # (checkpointing changes what the backward stores, not the output)
    layer_biases = biases if biases else [None] * len(weights)
    for weight, bias in zip(weights[:-1], layer_biases[:-1]):
        input = _linear_activation(input, weight, bias, activation, negative_slope, beta, threshold)
    out = F.linear(input, weights[-1], layer_biases[-1])
    return out if output_activation is None else _activation(out, output_activation, negative_slope, beta, threshold)


def decompositions():
    """{op: its decomposition} for handgrad's forward ops (linear_activation, activation, mlp),
    to add to a table for ExportedProgram.run_decompositions. The in-place activation needs
    none: handgrad's modules export it as the op and a copy (functional._elementwise), which
    export makes functional; a mutating op would stay behind auto_functionalized, which no
    decomposition table reaches."""
    ops = torch.ops.handgrad
    return {ops.linear_activation.default: _linear_activation, ops.activation.default: _activation,
            ops.mlp.default: _mlp}
