"""Drop-in modules: fused Linear+activation layers, standalone activations, and fuse().

The fused layers are nn.Linear subclasses: the same constructor, parameters (`weight`,
`bias`), initialisation, state_dict and repr, with the activation applied in the same
kernel as the bias.
"""

import logging
import warnings
from typing import NamedTuple

import torch
import torch.fx
from torch import nn
from torch.nn.modules import module as _module

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
    """relu(input), elementwise; inplace=True overwrites the input, as nn.ReLU(inplace=True)."""

    __constants__ = ["inplace"]

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input):
        return F.relu(input, inplace=self.inplace)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class LeakyReLU(nn.Module):
    """leaky_relu(input, negative_slope), elementwise; the signature of nn.LeakyReLU."""

    __constants__ = ["inplace", "negative_slope"]

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__()
        self.negative_slope = F.check_negative_slope(negative_slope)
        self.inplace = inplace

    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope, inplace=self.inplace)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class Sigmoid(nn.Module):
    """sigmoid(input), elementwise."""

    def forward(self, input):
        return F.sigmoid(input)


_FUSED_LAYERS = {"relu": LinearReLU, "leaky_relu": LinearLeakyReLU, "sigmoid": LinearSigmoid}


def _has_hooks(module):
    """Whether module has hooks of its own around its forward or backward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks():
    """Whether hooks registered for every module are set (nn.modules.module.register_module_*)."""
    return (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class MLP(nn.Module):
    """A network of fused hidden layers and a plain nn.Linear output layer, run as one op.

    sizes = [D_i, D_1, ..., D_K, D_o] gives K hidden layers, `hidden[k]` (LinearReLU,
    LinearLeakyReLU or LinearSigmoid), and the output layer `output`. The forward and the
    backward of the whole network are one hand-written op, torch.ops.handgrad.mlp: the
    backpropagation algorithm of section 7.4, one call and one autograd node for the network.
    On the CPU it runs as one fused kernel, blocks of rows through every layer while they are
    in cache.

    bias=False gives layers without a bias (the parameters of the same stack of
    nn.Linear(bias=False)). output_activation ("relu", "leaky_relu" with the same slope,
    "sigmoid", or None) follows the output layer.

    With checkpoint_every=k (problem 7.11) the op stores the output of every k-th hidden layer
    only and recomputes the others, a stretch of k layers at a time, during the backward:
    memory for about L/k + k layers' outputs instead of L, for one more forward pass.

    Hooks registered on a layer keep firing: while any layer has hooks the network runs
    layer by layer (and without checkpointing).
    """

    def __init__(self, sizes, activation="relu", negative_slope=0.01, checkpoint_every=None, *,
                 bias=True, output_activation=None, device=None, dtype=None):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least the input and output sizes, got {sizes}")
        if activation not in _FUSED_LAYERS:
            raise ValueError(f"activation must be one of {sorted(_FUSED_LAYERS)}, got {activation!r}")
        F.check_checkpoint_every(checkpoint_every)
        self.activation = activation
        self.negative_slope = F.check_negative_slope(negative_slope)
        self.output_activation = F.check_output_activation(output_activation)
        extra = {"negative_slope": self.negative_slope} if activation == "leaky_relu" else {}
        self.hidden = nn.ModuleList(
            _FUSED_LAYERS[activation](d_in, d_out, bias=bias, device=device, dtype=dtype, **extra)
            for d_in, d_out in zip(sizes[:-2], sizes[1:-1])
        )
        self.output = nn.Linear(sizes[-2], sizes[-1], bias=bias, device=device, dtype=dtype)
        self.checkpoint_every = checkpoint_every

    def forward(self, input):
        # _modules and _parameters directly: Module.__getattr__ would cost a tiny network
        # measurable time.
        layers = (*self._modules["hidden"]._modules.values(), self._modules["output"])
        if _global_hooks() or any(map(_has_hooks, layers)):
            for layer in layers:
                input = layer(input)
            return self._output_activation(input)
        weights = [layer._parameters["weight"] for layer in layers]
        biases = [layer._parameters["bias"] for layer in layers]
        return F._mlp(input, weights, [] if biases[0] is None else biases, self.activation,
                      self.negative_slope, self.checkpoint_every or 0, self.output_activation)

    def _output_activation(self, out):
        if self.output_activation is None:
            return out
        return F._elementwise(out, self.output_activation, self.negative_slope, inplace=False)

    def extra_repr(self):
        parts = [f"checkpoint_every={self.checkpoint_every}"] if self.checkpoint_every else []
        if self.output_activation is not None:
            parts.append(f"output_activation={self.output_activation!r}")
        return ", ".join(parts)


# --- fuse(): Linear + activation pairs of any model, rewritten as fused layers ---

_ACTIVATION_MODULES = {nn.ReLU: "relu", ReLU: "relu", nn.LeakyReLU: "leaky_relu",
                       LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", Sigmoid: "sigmoid"}
_ACTIVATION_FUNCTIONS = {
    torch.relu: "relu", torch.relu_: "relu", torch.nn.functional.relu: "relu",
    torch.nn.functional.relu_: "relu", F.relu: "relu",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", torch.nn.functional.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.nn.functional.leaky_relu: "leaky_relu", torch.nn.functional.leaky_relu_: "leaky_relu",
    F.leaky_relu: "leaky_relu",
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_DEFAULT_SLOPE = 0.01

_log = logging.getLogger("handgrad.fuse")


class FusionDecision(NamedTuple):
    """What fuse() did with one nn.Linear: `name` is its qualified name in the model."""

    name: str
    fused: bool
    reason: str


def _fused_layer(linear, activation, negative_slope):
    """The fused module for linear followed by activation, sharing linear's parameters."""
    extra = {"negative_slope": negative_slope} if activation == "leaky_relu" else {}
    # Built on the meta device, so nothing is allocated or initialised, then given the
    # linear layer's own parameters.
    fused = _FUSED_LAYERS[activation](linear.in_features, linear.out_features,
                                      bias=linear.bias is not None, device="meta", **extra)
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def _is_linear(module):
    """Whether module is an nn.Linear fuse() must decide on: not one of handgrad's own."""
    return isinstance(module, nn.Linear) and type(module).__module__ != __name__


def _why_not_fusable(linear, activation_module=None):
    """Why linear (and its activation module) must stay as they are, or None."""
    if type(linear) is not nn.Linear:  # a subclass may change forward
        return f"{type(linear).__name__} is not nn.Linear itself"
    if _has_hooks(linear):
        return "it has hooks, which must keep seeing its own output"
    if activation_module is not None and _has_hooks(activation_module):
        return "its activation module has hooks"
    return None


def _fuse_sequentials(module, prefix, decisions):
    """In place: nn.Linear + activation module pairs inside every nn.Sequential; the
    activation becomes nn.Identity, so positions and state_dict keys stay as they were."""
    if isinstance(module, nn.Sequential):
        for index in range(len(module) - 1):
            linear, activation = module[index], module[index + 1]
            name = _ACTIVATION_MODULES.get(type(activation))
            if not _is_linear(linear) or name is None:
                continue
            qualified = f"{prefix}{index}"
            reason = _why_not_fusable(linear, activation)
            if reason is not None:
                decisions.append(FusionDecision(qualified, False, reason))
                continue
            module[index] = _fused_layer(linear, name, getattr(activation, "negative_slope", None))
            module[index + 1] = nn.Identity()
            decisions.append(FusionDecision(qualified, True, f"fused with the {name} after it"))
    for child_name, child in module.named_children():
        _fuse_sequentials(child, f"{prefix}{child_name}.", decisions)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with handgrad's modules kept whole, as torch.nn's are."""

    def is_leaf_module(self, module, qualified_name):
        return type(module).__module__ == __name__ or super().is_leaf_module(module, qualified_name)


def _activation_of(node, modules):
    """(activation, negative_slope) that node applies to its first argument, or (None, why)."""
    if node.op == "call_module":
        module = modules[node.target]
        name = _ACTIVATION_MODULES.get(type(module))
        if name is None:
            return None, f"{type(module).__name__} follows it"
        return name, getattr(module, "negative_slope", None)
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        if name != "leaky_relu":
            return name, None
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", _DEFAULT_SLOPE)
        if not isinstance(slope, (int, float)) or isinstance(slope, bool):
            return None, "its leaky_relu's slope is computed at run time"
        return name, float(slope)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return _ACTIVATION_METHODS[node.target], None
    if node.op == "output":
        return None, "nothing follows it"
    target = getattr(node.target, "__name__", node.target)
    return None, f"{target} follows it"


def _fuse_graph(module, decisions):
    """A GraphModule of module with every fusable nn.Linear + activation fused, or None if
    there is nothing to fuse. Raises what torch.fx raises for a model it cannot trace."""
    tracer = _Tracer()
    graph = tracer.trace(module)
    modules = dict(module.named_modules())
    replacements = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or not _is_linear(modules[node.target]):
            continue
        users = list(node.users)
        if len(users) != 1:
            why = "nothing follows it" if not users else f"its output is used {len(users)} times"
            decisions.append(FusionDecision(node.target, False, why))
            continue
        (user,) = users
        activation, slope_or_why = _activation_of(user, modules)
        if activation is None or user.args[:1] != (node,):
            decisions.append(FusionDecision(node.target, False, slope_or_why if activation is None
                                            else "its output is not the activation's input"))
            continue
        activation_module = modules[user.target] if user.op == "call_module" else None
        reason = _why_not_fusable(modules[node.target], activation_module)
        if reason is not None:
            decisions.append(FusionDecision(node.target, False, reason))
            continue
        replacements[node.target] = _fused_layer(modules[node.target], activation, slope_or_why)
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        decisions.append(FusionDecision(node.target, True, f"fused with the {activation} after it"))
    if not replacements:
        return None
    fused = torch.fx.GraphModule(tracer.root, graph, module.__class__.__name__)
    for name, layer in replacements.items():
        _set_submodule(fused, name, layer)
    fused.train(module.training)
    return fused


def _set_submodule(root, qualified_name, module):
    """root.<qualified_name> = module (nn.Module.set_submodule, which torch 2.4 lacks)."""
    parent, _, name = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fuse(model, verbose=False):
    """Fuse every nn.Linear followed by ReLU, LeakyReLU or Sigmoid in model.

    The activation may be a module (nn.ReLU(inplace=True) included) or a call in forward:
    F.relu, torch.relu, x.relu(), torch.sigmoid, F.leaky_relu with its slope, and handgrad's
    own. The fused layer (LinearReLU, ...) shares the Linear's parameters, so optimizers built
    before keep working, and takes its name, so state_dicts load both ways.

    - Inside nn.Sequential containers the pairs are fused in place: the activation becomes
      nn.Identity, and the model keeps its type.
    - Calls in forward are found by torch.fx (symbolic_trace). If any remain to fuse, the
      result is a torch.fx.GraphModule of the model; otherwise the model itself.
    - Left unfused: a Linear subclass, a Linear or activation module with hooks (they must
      keep seeing what they see now), a Linear whose output is used more than once.
    - A model torch.fx cannot trace (data-dependent control flow, say) gets the nn.Sequential
      pass only, and one warning that says why.

    Each decision, with its reason, is logged to the "handgrad.fuse" logger; verbose=True
    prints them.
    """
    decisions = []
    _fuse_sequentials(model, "", decisions)
    try:
        result = _fuse_graph(model, decisions)
    except Exception as error:  # torch.fx raises many kinds for untraceable code
        warnings.warn(f"handgrad.nn.fuse: torch.fx cannot trace {type(model).__name__} "
                      f"({type(error).__name__}: {error}); only Linear + activation pairs inside "
                      "nn.Sequential containers were fused", stacklevel=2)
        result = None
    for decision in sorted(set(decisions)):
        _log.info("%s: %s (%s)", decision.name, "fused" if decision.fused else "not fused", decision.reason)
        if verbose:
            print(f"handgrad.nn.fuse: {decision.name}: {'fused' if decision.fused else 'not fused'}, "
                  f"{decision.reason}")
    return model if result is None else result


__all__ = [
    "LinearReLU",
    "LinearLeakyReLU",
    "LinearSigmoid",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "MLP",
    "fuse",
    "FusionDecision",
]
