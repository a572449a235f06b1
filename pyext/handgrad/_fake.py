"""Fake (meta) kernels of the handgrad ops: output shapes only, for torch.compile and export.

They make the same argument checks as csrc/checks.h, so that a traced program fails with
the same message as an eager one.
"""

import math

import torch

_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _op_name(schema_name, activation):
    """The name users know an op by, as in csrc/checks.h: the schema's name with
    "activation" replaced by the activation ("linear_relu", "sigmoid_backward", ...)."""
    return schema_name.replace("activation", activation, 1)


def _check(condition, op, message):
    torch._check(condition, lambda: f"{op}: {message}")


def _check_common(op, activation, negative_slope, first_name, first):
    torch._check_value(
        activation in ("relu", "leaky_relu", "sigmoid"),
        lambda: f"handgrad: unknown activation '{activation}'; "
        "expected 'relu', 'leaky_relu' or 'sigmoid'",
    )
    torch._check_value(
        math.isfinite(negative_slope),
        lambda: f"{op}: negative_slope must be a finite number, got {negative_slope}",
    )
    _check(first.dtype in _FLOATING, op, f"{first_name} has dtype {first.dtype}; expected a "
           "floating-point dtype")


def _check_same(op, name, other, reference_name, reference):
    _check(other.device == reference.device, op, f"{name} is on {other.device} but "
           f"{reference_name} is on {reference.device}; all tensors must be on one device")
    _check(other.dtype == reference.dtype, op, f"{name} has dtype {other.dtype} but "
           f"{reference_name} has dtype {reference.dtype}")


@torch.library.register_fake("handgrad::linear_activation")
def _linear_activation_fake(input, weight, bias, activation, negative_slope=0.01):
    op = _op_name("linear_activation", activation)
    _check_common(op, activation, negative_slope, "input", input)
    _check_same(op, "weight", weight, "input", input)
    if bias is not None:
        _check_same(op, "bias", bias, "input", input)
    _check(input.dim() >= 1, op, "input must have shape (*, in_features) with at least 1 "
           "dimension, got a 0-D tensor")
    _check(weight.dim() == 2, op, "weight must be 2-D (out_features, in_features), got shape "
           f"{list(weight.shape)}")
    _check(weight.shape[1] == input.shape[-1], op, f"weight has {weight.shape[1]} columns but "
           f"input has {input.shape[-1]} features")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op, "bias must have shape "
               f"[{weight.shape[0]}] (out_features), got shape {list(bias.shape)}")
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("handgrad::activation")
def _activation_fake(input, activation, negative_slope=0.01):
    _check_common(_op_name("activation", activation), activation, negative_slope, "input", input)
    return torch.empty_like(input)  # its memory format, as the kernels keep it


@torch.library.register_fake("handgrad::activation_")
def _activation_inplace_fake(input, activation, negative_slope=0.01):
    _check_common(_op_name("activation_", activation), activation, negative_slope, "input", input)


def _check_backward(op, grad_output, saved, activation, negative_slope):
    _check_common(op, activation, negative_slope, "grad_output", grad_output)
    _check_same(op, "saved", saved, "grad_output", grad_output)
    _check(grad_output.shape == saved.shape, op, f"grad_output has shape "
           f"{list(grad_output.shape)} but saved has shape {list(saved.shape)}")


@torch.library.register_fake("handgrad::activation_backward")
def _activation_backward_fake(grad_output, saved, activation, negative_slope=0.01):
    _check_backward(_op_name("activation_backward", activation), grad_output, saved, activation,
                    negative_slope)
    return torch.empty_like(saved)


@torch.library.register_fake("handgrad::bias_activation_backward")
def _bias_activation_backward_fake(grad_output, saved, activation, negative_slope=0.01):
    op = _op_name("bias_activation_backward", activation)
    _check_backward(op, grad_output, saved, activation, negative_slope)
    _check(saved.dim() >= 1, op, "saved must have shape (*, out_features), got a 0-D tensor")
    return saved.new_empty(saved.shape), saved.new_empty(saved.shape[-1:])


@torch.library.register_fake("handgrad::linear_activation_backward")
def _linear_activation_backward_fake(grad_output, input, weight, saved, activation,
                                     negative_slope, output_mask):
    op = _op_name("linear_activation_backward", activation)
    _check_backward(op, grad_output, saved, activation, negative_slope)
    _check_same(op, "input", input, "grad_output", grad_output)
    _check_same(op, "weight", weight, "grad_output", grad_output)
    _check(weight.dim() == 2 and input.dim() >= 1 and weight.shape[1] == input.shape[-1]
           and saved.shape == (*input.shape[:-1], weight.shape[0]), op,
           f"shapes do not match: input {list(input.shape)}, weight {list(weight.shape)}, "
           f"saved {list(saved.shape)}")
    need_input, need_weight, need_bias = output_mask
    return (
        input.new_empty(input.shape) if need_input else None,
        weight.new_empty(weight.shape) if need_weight else None,
        saved.new_empty(saved.shape[-1:]) if need_bias else None,
    )


def _check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
               output_activation):
    _check_common("mlp", activation, negative_slope, "input", input)
    if output_activation is not None:
        _check_common("mlp", output_activation, negative_slope, "input", input)
    torch._check_value(checkpoint_every >= 0, lambda: "mlp: checkpoint_every must be 0 (none) "
                       f"or a positive number of layers, got {checkpoint_every}")
    _check(len(weights) >= 1, "mlp", "weights must list at least the output layer, got none")
    _check(len(biases) in (0, len(weights)), "mlp", f"got {len(weights)} weights but "
           f"{len(biases)} biases; give one bias per layer, or none")
    _check(input.dim() >= 1, "mlp", "input must have shape (*, in_features) with at least 1 "
           "dimension, got a 0-D tensor")
    features = input.shape[-1]
    for layer, weight in enumerate(weights):
        _check_same("mlp", f"weights[{layer}]", weight, "input", input)
        _check(weight.dim() == 2 and weight.shape[1] == features, "mlp", f"weights[{layer}] "
               f"has shape {list(weight.shape)}, expected (out_features, {features})")
        if biases:
            bias = biases[layer]
            _check_same("mlp", f"biases[{layer}]", bias, "input", input)
            _check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], "mlp", f"biases[{layer}] "
                   f"must have shape [{weight.shape[0]}], got shape {list(bias.shape)}")
        features = weight.shape[0]


@torch.library.register_fake("handgrad::mlp")
def _mlp_fake(input, weights, biases, activation, negative_slope=0.01, checkpoint_every=0,
              output_activation=None):
    _check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
               output_activation)
    return input.new_empty((*input.shape[:-1], weights[-1].shape[0]))


@torch.library.register_fake("handgrad::mlp_forward")
def _mlp_forward_fake(input, weights, biases, activation, negative_slope, checkpoint_every,
                      output_activation=None):
    _check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
               output_activation)
    rows = math.prod(input.shape[:-1])
    hidden = len(weights) - 1
    kept = [layer for layer in range(1, hidden + 1)
            if checkpoint_every == 0 or (layer % checkpoint_every == 0 and layer < hidden)]
    saved = [input.new_empty((rows, weights[layer - 1].shape[0])) for layer in kept]
    return input.new_empty((*input.shape[:-1], weights[-1].shape[0])), saved


@torch.library.register_fake("handgrad::mlp_backward")
def _mlp_backward_fake(grad_output, input, weights, biases, saved, activation, negative_slope,
                       checkpoint_every, input_requires_grad, output_activation=None):
    _check_mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
               output_activation)
    return (input.new_empty(input.shape) if input_requires_grad else None,
            [w.new_empty(w.shape) for w in weights], [b.new_empty(b.shape) for b in biases])
