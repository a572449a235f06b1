"""vmap rules of the handgrad ops, for torch.func.vmap and what is built on it: jacrev,
jacfwd, per-sample gradients, and gradcheck's batched checks.

The elementwise ops and a batched input of linear_activation just take the vmapped
dimension as one more leading dimension. Where a per-sample answer would need a different
kernel (a batched weight, per-sample weight gradients), the rule runs the op once per sample.
"""

import math

import torch

_ops = torch.ops.handgrad


def _batch_first(tensor, batch_dim, batch_size):
    """The tensor with its vmapped dimension first; an unbatched one is expanded to match."""
    if batch_dim is None:
        return tensor.expand(batch_size, *tensor.shape)
    return tensor.movedim(batch_dim, 0)


def _sample(arg, dim, i):
    """Sample i of an argument: a tensor (dim None: not batched) or a list of them."""
    if isinstance(arg, (list, tuple)):
        return [_sample(a, d, i) for a, d in zip(arg, dim)]
    return arg if dim is None else arg.select(dim, i)


def _per_sample(op, info, in_dims, args):
    """Run op on each sample and stack the results (None results stay None)."""
    results = []
    for i in range(info.batch_size):
        results.append(op(*[_sample(arg, dim, i) for arg, dim in zip(args, in_dims)]))
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results), 0
    stacked = tuple(
        None if parts[0] is None else torch.stack(parts) for parts in zip(*results)
    )
    return stacked, tuple(None if t is None else 0 for t in stacked)


@torch.library.register_vmap("handgrad::activation")
def _activation_vmap(info, in_dims, input, activation, negative_slope=0.01, beta=1.0, threshold=20.0):
    return _ops.activation(input.movedim(in_dims[0], 0), activation, negative_slope, beta, threshold), 0


@torch.library.register_vmap("handgrad::activation_backward")
def _activation_backward_vmap(info, in_dims, grad_output, out_or_f, activation, negative_slope=0.01,
                              beta=1.0, threshold=20.0):
    grad_output, out_or_f = (
        _batch_first(t, d, info.batch_size) for t, d in zip((grad_output, out_or_f), in_dims)
    )
    return _ops.activation_backward(grad_output, out_or_f, activation, negative_slope, beta, threshold), 0


@torch.library.register_vmap("handgrad::bias_activation_backward")
def _bias_activation_backward_vmap(info, in_dims, grad_output, out_or_f, activation,
                                   negative_slope=0.01, beta=1.0, threshold=20.0):
    grad_output, out_or_f = (
        _batch_first(t, d, info.batch_size) for t, d in zip((grad_output, out_or_f), in_dims)
    )
    grad_pre = _ops.activation_backward(grad_output, out_or_f, activation, negative_slope, beta, threshold)
    # Each sample's bias gradient sums its own rows only.
    rows = math.prod(grad_pre.shape[1:-1])
    grad_bias = grad_pre.reshape(info.batch_size, rows, grad_pre.shape[-1]).sum(1)
    return (grad_pre, grad_bias), (0, 0)


@torch.library.register_vmap("handgrad::linear_activation")
def _linear_activation_vmap(info, in_dims, input, weight, bias, activation, negative_slope=0.01,
                            beta=1.0, threshold=20.0):
    input_dim, weight_dim, bias_dim = in_dims[:3]
    if weight_dim is None and bias_dim is None:
        return _ops.linear_activation(input.movedim(input_dim, 0), weight, bias, activation,
                                      negative_slope, beta, threshold), 0
    return _per_sample(_ops.linear_activation, info, in_dims,
                       (input, weight, bias, activation, negative_slope, beta, threshold))


@torch.library.register_vmap("handgrad::linear_activation_backward")
def _linear_activation_backward_vmap(info, in_dims, grad_output, input, weight, out_or_f,
                                     activation, negative_slope, output_mask, beta=1.0, threshold=20.0):
    # Per-sample weight and bias gradients cannot come from one sum over all rows.
    return _per_sample(_ops.linear_activation_backward, info, in_dims,
                       (grad_output, input, weight, out_or_f, activation, negative_slope, output_mask,
                        beta, threshold))


@torch.library.register_vmap("handgrad::mlp")
def _mlp_vmap(info, in_dims, input, weights, biases, activation, negative_slope=0.01,
              checkpoint_every=0, output_activation=None, beta=1.0, threshold=20.0):
    input_dim, weight_dims, bias_dims = in_dims[:3]
    if all(d is None for d in (*weight_dims, *bias_dims)):
        return _ops.mlp(input.movedim(input_dim, 0), weights, biases, activation, negative_slope,
                        checkpoint_every, output_activation, beta, threshold), 0
    return _per_sample(_ops.mlp, info, in_dims, (input, weights, biases, activation,
                                                 negative_slope, checkpoint_every,
                                                 output_activation, beta, threshold))
