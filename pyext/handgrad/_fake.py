"""Fake (meta) kernels of the handgrad ops: output shapes only, for torch.compile, export
and meta tensors.

Each first makes its op's argument check, the C++ function the CPU and CUDA kernels call
(csrc/checks.h, through handgrad._C), so a traced program or a call on meta tensors fails
with the message an eager call gives.
"""

import math

import torch

from . import _C


@torch.library.register_fake("handgrad::linear_activation")
def _linear_activation_fake(input, weight, bias, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    _C.check_linear_activation(input, weight, bias, activation, negative_slope, beta, threshold)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("handgrad::activation")
def _activation_fake(input, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    _C.check_activation(input, activation, negative_slope, beta, threshold, False)
    return torch.empty_like(input)  # its memory format, as the kernels keep it


@torch.library.register_fake("handgrad::activation_")
def _activation_inplace_fake(input, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    _C.check_activation(input, activation, negative_slope, beta, threshold, True)


@torch.library.register_fake("handgrad::activation_backward")
def _activation_backward_fake(grad_output, out_or_f, activation, negative_slope=0.01, beta=1.0,
                              threshold=20.0):
    _C.check_activation_backward(grad_output, out_or_f, activation, negative_slope, beta, threshold)
    return torch.empty_like(out_or_f)


@torch.library.register_fake("handgrad::bias_activation_backward")
def _bias_activation_backward_fake(grad_output, out_or_f, activation, negative_slope=0.01, beta=1.0,
                                   threshold=20.0):
    _C.check_bias_activation_backward(grad_output, out_or_f, activation, negative_slope, beta, threshold)
    return out_or_f.new_empty(out_or_f.shape), out_or_f.new_empty(out_or_f.shape[-1:])


@torch.library.register_fake("handgrad::linear_activation_backward")
def _linear_activation_backward_fake(grad_output, input, weight, out_or_f, activation,
                                     negative_slope, output_mask, beta=1.0, threshold=20.0):
    _C.check_linear_activation_backward(grad_output, input, weight, out_or_f, activation,
                                        negative_slope, beta, threshold)
    need_input, need_weight, need_bias = output_mask
    return (
        input.new_empty(input.shape) if need_input else None,
        weight.new_empty(weight.shape) if need_weight else None,
        out_or_f.new_empty(out_or_f.shape[-1:]) if need_bias else None,
    )


@torch.library.register_fake("handgrad::mlp")
def _mlp_fake(input, weights, biases, activation, negative_slope=0.01, checkpoint_every=0,
              output_activation=None, beta=1.0, threshold=20.0):
    _C.check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
                 output_activation, beta, threshold)
    return input.new_empty((*input.shape[:-1], weights[-1].shape[0]))


@torch.library.register_fake("handgrad::mlp_forward")
def _mlp_forward_fake(input, weights, biases, activation, negative_slope, checkpoint_every,
                      output_activation=None, beta=1.0, threshold=20.0):
    _C.check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
                 output_activation, beta, threshold)
    rows = math.prod(input.shape[:-1])
    hidden = len(weights) - 1
    kept = [made for made in range(1, hidden + 1)
            if _C.is_stored_output(made, hidden, checkpoint_every)]
    hidden_outputs = [input.new_empty((rows, weights[layer - 1].shape[0])) for layer in kept]
    return input.new_empty((*input.shape[:-1], weights[-1].shape[0])), hidden_outputs


@torch.library.register_fake("handgrad::mlp_backward")
def _mlp_backward_fake(grad_output, input, weights, biases, hidden_outputs, activation, negative_slope,
                       checkpoint_every, input_requires_grad, output_activation=None,
                       parameters_require_grad=True, beta=1.0, threshold=20.0):
    _C.check_mlp_backward(input, weights, biases, hidden_outputs, activation, negative_slope,
                          checkpoint_every, output_activation, beta, threshold)
    if not parameters_require_grad:
        weights, biases = [], []
    return (input.new_empty(input.shape) if input_requires_grad else None,
            [w.new_empty(w.shape) for w in weights], [b.new_empty(b.shape) for b in biases])


@torch.library.register_fake("handgrad::mlp_double_backward")
def _mlp_double_backward_fake(grad_output, input, weights, biases, hidden_outputs, grad_grad_input,
                              grad_grad_weights, grad_grad_biases, activation, negative_slope,
                              output_activation, output_mask, beta=1.0, threshold=20.0):
    _C.check_mlp_double_backward(grad_output, input, weights, biases, hidden_outputs, grad_grad_input,
                                 grad_grad_weights, grad_grad_biases, activation, negative_slope,
                                 output_activation, beta, threshold)
    ask_grad_output, ask_input, ask_weights, ask_biases = output_mask
    return (grad_output.new_empty(grad_output.shape) if ask_grad_output else None,
            input.new_empty(input.shape) if ask_input else None,
            [w.new_empty(w.shape) for w in weights] if ask_weights else [],
            [b.new_empty(b.shape) for b in biases] if ask_biases else [])
