"""How the handgrad ops run on DTensors (tensor parallelism, DTensor data parallelism).

Each op gets DTensor sharding rules, registered with
torch.distributed.tensor.experimental.register_sharding as soon as both handgrad and
torch.distributed.tensor are imported, in either order. A rule
lists the placements, one mesh dimension at a time, under which the op computed on each
rank's local shards gives the shards of the true result; DTensor redistributes the inputs
to the cheapest of them first. The ops that return lists (mlp_forward, mlp_backward, mlp_double_backward) have
DTensor handlers instead, as DTensor's own convolution has.

No fused layer ever gives a Partial output: relu(a + b) is not relu(a) + relu(b), and
DTensor would trust such a rule and train silently wrong. So for a row-wise weight
(Shard(1)) with a column-sharded input, the forward's only rules need the weight whole or
sharded by rows of Omega: DTensor all-gathers the input (rows x in_features) and either
all-gathers the weight or turns it into Shard(0) with an all-to-all (out x in / n per rank),
whichever its cost model finds cheaper. The backward ops, which are linear in grad_output,
do give Partial gradients where that is exact (dl/dh under a column-wise weight, dl/dOmega
under a batch-sharded input).
"""

import importlib.machinery
import math
import sys

import torch

_ops = torch.ops.handgrad
DTensor = Partial = Replicate = Shard = DTensorSpec = TensorMeta = R = None


def _maybe(tensor, placement):
    """The placement for an optional tensor argument: None where it is absent."""
    return None if tensor is None else placement


# --- The per-element and per-layer ops: register_sharding rules ---

def _activation_rule(input, *_):
    # Elementwise: any Shard or Replicate, never Partial (a[x + y] != a[x] + a[y]).
    return [([R], [R])] + [([Shard(d)], [Shard(d)]) for d in range(input.ndim)]


def _activation_inplace_rule(input, *_):
    # The same placements, and no output: the result is input itself.
    return [([], [R])] + [([], [Shard(d)]) for d in range(input.ndim)]


def _activation_backward_rule(grad_output, out_or_f, *_):
    # grad_output * a'(out_or_f): elementwise, and linear in grad_output.
    rules = [([R], [R, R])] + [([Shard(d)], [Shard(d), Shard(d)]) for d in range(out_or_f.ndim)]
    return rules + [([Partial()], [Partial(), R])]


def _bias_activation_backward_rule(grad_output, out_or_f, *_):
    # dl/df as above, and dl/dbeta its sum over every dimension but the last.
    last = out_or_f.ndim - 1
    rules = [([R, R], [R, R]), ([Partial(), Partial()], [Partial(), R]),
             ([Shard(last), Shard(0)], [Shard(last), Shard(last)])]
    return rules + [([Shard(d), Partial()], [Shard(d), Shard(d)]) for d in range(last)]


def _linear_activation_rule(input, weight, bias, *_):
    # out = a[beta + Omega h]: replicated; sharded along a batch dimension of h; or column-wise
    # (Omega and beta by rows, the output by features). Never Partial: see the module text.
    last = input.ndim - 1
    rules = [([R], [R, R, _maybe(bias, R)]),
             ([Shard(last)], [R, Shard(0), _maybe(bias, Shard(0))])]
    return rules + [([Shard(d)], [Shard(d), R, _maybe(bias, R)]) for d in range(last)]


def _linear_activation_backward_rule(grad_output, input, weight, out_or_f, *_):
    # (dl/dh, dl/dOmega, dl/dbeta) from (grad_output, h, Omega, out_or_f). dl/df is computed
    # whole wherever grad_output and out_or_f are, and the two products are linear in it.
    last = input.ndim - 1
    rules = [
        ([R, R, R], [R, R, R, R]),
        # grad_output Partial: each rank's share of dl/df gives its share of every gradient
        ([Partial(), Partial(), Partial()], [Partial(), R, R, R]),
        # column-wise Omega: dl/dh = sum over the output features, so Partial
        ([Partial(), Shard(0), Shard(0)], [Shard(last), R, Shard(0), Shard(last)]),
        # row-wise Omega (Shard(1)) with h sharded by features
        ([Shard(last), Shard(1), R], [R, Shard(last), Shard(1), R]),
    ]
    # a batch dimension: dl/dOmega and dl/dbeta sum over it, so Partial
    return rules + [([Shard(d), Partial(), Partial()], [Shard(d), Shard(d), R, Shard(d)])
                    for d in range(last)]


def _mlp_rule(input, weights, biases, *_):
    # The whole network on replicated parameters, the input replicated or sharded along a
    # batch dimension (rows are independent). Sharded parameters are all-gathered first.
    parameters = [R] * (len(weights) + len(biases))
    return [([R], [R, *parameters])] + [([Shard(d)], [Shard(d), *parameters])
                                        for d in range(input.ndim - 1)]


# --- mlp_forward, mlp_backward and mlp_double_backward: DTensor handlers ---
#
# Their outputs include lists, which register_sharding cannot describe. The handlers run
# the network on each rank's rows with every parameter replicated (all-gathered if it is
# sharded), and give each gradient the placement of the tensor it is the gradient of, as
# an autograd Function must: dl/dOmega, a sum over the rows, is all-reduced (replicated
# parameters) or reduce-scattered (sharded ones).

def _row_placements(input):
    """Where each mesh dimension leaves the rows of input as (rows, features): Shard(0) if the
    input is sharded along its first dimension (and has a feature dimension besides), else
    Replicate (a sharded feature or inner dimension is gathered first)."""
    return [p if isinstance(p, Shard) and p.dim == 0 and input.ndim >= 2 else R
            for p in input.placements]


def _summed_over_rows(placements):
    """The placements of a sum over the rows placed as `placements`."""
    return [Partial() if isinstance(p, Shard) else R for p in placements]


def _wrap(local, mesh, placements, shape):
    shape = torch.Size(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    meta = TensorMeta(shape, stride, local.dtype)
    return DTensor(local, DTensorSpec(mesh, tuple(placements), tensor_meta=meta),
                   requires_grad=False)


def _local(tensor, mesh, placements):
    return tensor.redistribute(mesh, placements).to_local()


def _all_dtensors(op, tensors):
    if not all(isinstance(t, DTensor) for t in tensors):
        raise TypeError(f"handgrad.{op}: got DTensor and plain torch.Tensor arguments together; "
                        "make every tensor a DTensor on one mesh (distribute_tensor, "
                        "DTensor.from_local)")


def _mlp_forward_handler(op_call, args, kwargs):
    input, weights, biases, *rest = args
    _all_dtensors("mlp_forward", [input, *weights, *biases])
    mesh, rows = input.device_mesh, _row_placements(input)
    whole = [R] * mesh.ndim
    with torch.no_grad():
        out, hidden_outputs = op_call(_local(input, mesh, rows), [_local(w, mesh, whole) for w in weights],
                             [_local(b, mesh, whole) for b in biases], *rest, **kwargs)
    row_count = math.prod(input.shape[:-1])
    return (_wrap(out, mesh, rows, (*input.shape[:-1], weights[-1].shape[0])),
            [_wrap(s, mesh, rows, (row_count, s.shape[1])) for s in hidden_outputs])


def _mlp_backward_handler(op_call, args, kwargs):
    grad_output, input, weights, biases, hidden_outputs, *rest = args
    _all_dtensors("mlp_backward", [grad_output, input, *weights, *biases, *hidden_outputs])
    mesh, rows = input.device_mesh, _row_placements(input)
    whole, sums = [R] * mesh.ndim, _summed_over_rows(rows)
    with torch.no_grad():
        grad_input, grad_weights, grad_biases = op_call(
            _local(grad_output, mesh, rows), _local(input, mesh, rows),
            [_local(w, mesh, whole) for w in weights], [_local(b, mesh, whole) for b in biases],
            [_local(s, mesh, rows) for s in hidden_outputs], *rest, **kwargs)

        def like(local, placements, reference):
            return _wrap(local, mesh, placements, reference.shape).redistribute(
                mesh, reference.placements)

        if grad_input is not None:  # input_requires_grad=False
            grad_input = like(grad_input, rows, input)
        return (grad_input, [like(g, sums, w) for g, w in zip(grad_weights, weights)],
                [like(g, sums, b) for g, b in zip(grad_biases, biases)])


def _mlp_double_backward_handler(op_call, args, kwargs):
    grad_output, input, weights, biases, hidden_outputs, v, V, u, *rest = args
    present = [t for t in (v, *V, *u) if t is not None]
    _all_dtensors("mlp_double_backward", [grad_output, input, *weights, *biases, *hidden_outputs, *present])
    mesh, rows = input.device_mesh, _row_placements(input)
    whole, sums = [R] * mesh.ndim, _summed_over_rows(rows)
    maybe = lambda t, placements: None if t is None else _local(t, mesh, placements)  # noqa: E731
    with torch.no_grad():
        # The cotangents of dl/dOmega and dl/dbeta are read whole by every row, as the weights.
        grad_grad_output, grad_input, grad_weights, grad_biases = op_call(
            _local(grad_output, mesh, rows), _local(input, mesh, rows),
            [_local(w, mesh, whole) for w in weights], [_local(b, mesh, whole) for b in biases],
            [_local(s, mesh, rows) for s in hidden_outputs], maybe(v, rows),
            [maybe(t, whole) for t in V], [maybe(t, whole) for t in u], *rest, **kwargs)

        def like(local, placements, reference):
            return _wrap(local, mesh, placements, reference.shape).redistribute(
                mesh, reference.placements)

        return (None if grad_grad_output is None else like(grad_grad_output, rows, grad_output),
                None if grad_input is None else like(grad_input, rows, input),
                [like(g, sums, w) for g, w in zip(grad_weights, weights)],
                [like(g, sums, b) for g, b in zip(grad_biases, biases)])


def _register():
    global DTensor, Partial, Replicate, Shard, DTensorSpec, TensorMeta, R
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor.experimental import register_sharding

    R = Replicate()
    rules = {
        _ops.activation.default: _activation_rule,
        _ops.activation_.default: _activation_inplace_rule,
        _ops.activation_backward.default: _activation_backward_rule,
        _ops.bias_activation_backward.default: _bias_activation_backward_rule,
        _ops.linear_activation.default: _linear_activation_rule,
        _ops.linear_activation_backward.default: _linear_activation_backward_rule,
        _ops.mlp.default: _mlp_rule,
    }
    for op, rule in rules.items():
        register_sharding(op)(rule)
    DTensor._op_dispatcher._custom_op_handlers.update({
        _ops.mlp_forward.default: _mlp_forward_handler,
        _ops.mlp_backward.default: _mlp_backward_handler,
        _ops.mlp_double_backward.default: _mlp_double_backward_handler,
    })


class _RegisterAfterImport:
    """A finder that lets torch.distributed.tensor load as usual and registers the rules right
    after: importing it from handgrad would add about half a second to every import, for
    programs that never make a DTensor."""

    _name = "torch.distributed.tensor"

    def find_spec(self, name, path, target=None):
        if name != self._name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _register()

            spec.loader.exec_module = exec_module
        return spec


def register_when_dtensor_is_imported():
    """Register the rules now if torch.distributed.tensor is loaded, else as it loads."""
    if not torch.distributed.is_available():
        return
    if _RegisterAfterImport._name in sys.modules:
        _register()
    else:
        sys.meta_path.insert(0, _RegisterAfterImport())


register_when_dtensor_is_imported()
