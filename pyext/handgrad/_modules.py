"""The drop-in modules themselves, which handgrad.nn exports (see there). They live here so
that _fuse.py, which builds on them, and nn.py, which re-exports fuse(), import them without
importing each other. Each class says it is handgrad.nn's, as its users know it (repr,
pickles of whole models)."""

from typing import List

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import functional as HF


class LinearReLU(nn.Linear):
    """relu(input @ weight.T + bias), initialised exactly as nn.Linear."""

    def forward(self, input):
        return HF.linear_relu(input, self.weight, self.bias)


class LinearLeakyReLU(nn.Linear):
    """leaky_relu(input @ weight.T + bias, negative_slope), initialised exactly as nn.Linear."""

    def __init__(self, in_features, out_features, bias=True, negative_slope=0.01, device=None,
                 dtype=None):
        negative_slope = HF.check_negative_slope(negative_slope)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.negative_slope = negative_slope

    def forward(self, input):
        return HF.linear_leaky_relu(input, self.weight, self.bias, self.negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"


class LinearSigmoid(nn.Linear):
    """sigmoid(input @ weight.T + bias), initialised exactly as nn.Linear."""

    def forward(self, input):
        return HF.linear_sigmoid(input, self.weight, self.bias)


class LinearTanh(nn.Linear):
    """tanh(input @ weight.T + bias), initialised exactly as nn.Linear."""

    def forward(self, input):
        return HF.linear_tanh(input, self.weight, self.bias)


class LinearSiLU(nn.Linear):
    """silu(input @ weight.T + bias), initialised exactly as nn.Linear."""

    def forward(self, input):
        return HF.linear_silu(input, self.weight, self.bias)


class LinearGELU(nn.Linear):
    """gelu(input @ weight.T + bias, approximate), approximate "none" or "tanh" as nn.GELU;
    initialised exactly as nn.Linear, with nn.Linear's state_dict."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 approximate="none"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        HF.gelu_activation(approximate)  # checks it
        self.approximate = approximate

    def forward(self, input):
        return HF.linear_gelu(input, self.weight, self.bias, self.approximate)

    def extra_repr(self):
        return super().extra_repr() + (f", approximate={self.approximate!r}" if self.approximate != "none" else "")


class LinearSoftplus(nn.Linear):
    """softplus(input @ weight.T + bias, beta, threshold), as nn.Softplus(beta, threshold);
    initialised exactly as nn.Linear, with nn.Linear's state_dict."""

    def __init__(self, in_features, out_features, bias=True, beta=1.0, threshold=20.0, device=None,
                 dtype=None):
        beta, threshold = HF.check_softplus(beta, threshold)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.beta, self.threshold = beta, threshold

    def forward(self, input):
        return HF.linear_softplus(input, self.weight, self.bias, self.beta, self.threshold)

    def extra_repr(self):
        return f"{super().extra_repr()}, beta={self.beta}, threshold={self.threshold}"


# The activation modules subclass torch.nn's own, with their signatures, attributes and
# reprs, so that code which finds activations by isinstance(m, nn.ReLU) (initialization by
# gain, hooks on every ReLU) finds these too; only forward differs.

class ReLU(nn.ReLU):
    """relu(input), elementwise; inplace=True overwrites the input, as nn.ReLU(inplace=True)."""

    def forward(self, input):
        return HF.relu(input, self.inplace)


class LeakyReLU(nn.LeakyReLU):
    """leaky_relu(input, negative_slope), elementwise; the signature of nn.LeakyReLU."""

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        HF.check_negative_slope(negative_slope)
        super().__init__(negative_slope, inplace)

    def forward(self, input):
        return HF.leaky_relu(input, self.negative_slope, inplace=self.inplace)


class Sigmoid(nn.Sigmoid):
    """sigmoid(input), elementwise."""

    def forward(self, input):
        return HF.sigmoid(input)


class Tanh(nn.Tanh):
    """tanh(input), elementwise."""

    def forward(self, input):
        return HF.tanh(input)


class SiLU(nn.SiLU):
    """silu(input), elementwise; the signature of nn.SiLU."""

    def forward(self, input):
        return HF.silu(input, self.inplace)


class GELU(nn.GELU):
    """gelu(input, approximate), elementwise; the signature of nn.GELU."""

    def __init__(self, approximate: str = "none") -> None:
        HF.gelu_activation(approximate)
        super().__init__(approximate)

    def forward(self, input):
        return HF.gelu(input, approximate=self.approximate)


class Softplus(nn.Softplus):
    """softplus(input, beta, threshold), elementwise; the signature of nn.Softplus."""

    def __init__(self, beta: float = 1.0, threshold: float = 20.0) -> None:
        HF.check_softplus(beta, threshold)
        super().__init__(beta, threshold)

    def forward(self, input):
        return HF.softplus(input, self.beta, self.threshold)


_FUSED_LAYERS = {"relu": LinearReLU, "leaky_relu": LinearLeakyReLU, "sigmoid": LinearSigmoid,
                 "tanh": LinearTanh, "silu": LinearSiLU, "gelu": LinearGELU, "gelu_tanh": LinearGELU,
                 "softplus": LinearSoftplus}


def _has_hooks(module):
    """Whether module has hooks of its own around its forward or backward."""
    # (through __dict__: nn.Module's __getattr__ makes each attribute read slow, and
    # handgrad.nn.MLP asks this of every layer at each call)
    attributes = module.__dict__
    return bool(attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or attributes["_backward_hooks"]
                or attributes["_backward_pre_hooks"])


_BARE_LAYERS = (LinearReLU, LinearLeakyReLU, LinearSigmoid, LinearTanh, LinearSiLU, LinearGELU,
                LinearSoftplus, nn.Linear)


def _runs_in_the_op(layer):
    """Whether MLP's one op may stand for calling layer: a bare layer of ours (or the output
    nn.Linear) that holds its own parameters and has no hooks. A wrapped layer (activation
    checkpointing, FSDP1, any wrapper module) is called as a module, so the wrapper does its
    job; a layer under weight norm or with hooks likewise."""
    return type(layer) in _BARE_LAYERS and "weight" in layer.__dict__["_parameters"] and not _has_hooks(layer)


def _run_in_the_op(input, layers, activation, parameters, output_activation, checkpoint_every=0):
    """layers (each _runs_in_the_op, biases all present or all absent) as MLP's one op,
    their parameters read as they are now (handgrad.nn.MLP, and a run of pairs in a fused
    nn.Sequential)."""
    weights = [layer._parameters["weight"] for layer in layers]
    biases = [layer._parameters["bias"] for layer in layers]
    return HF._mlp(input, weights, [] if biases[0] is None else biases, activation, parameters,
                   checkpoint_every, output_activation)


def _global_hooks():
    """Whether hooks registered for every module are set (nn.modules.module.register_module_*)."""
    return (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class MLP(nn.Module):
    """A network of fused hidden layers and a plain nn.Linear output layer, run as one op.

    sizes = [D_i, D_1, ..., D_K, D_o] gives K hidden layers, `hidden[k]` (LinearReLU,
    LinearLeakyReLU, LinearSigmoid, LinearTanh, LinearSiLU, LinearGELU or LinearSoftplus, by
    activation: "relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh" (GELU's
    tanh approximation) or "softplus"), and the output layer `output`. negative_slope is
    leaky_relu's; beta and threshold are softplus's (an SDF's softplus(beta=100)). The forward and the
    backward of the whole network are one hand-written op, torch.ops.handgrad.mlp: the
    backpropagation algorithm of section 7.4, one call and one autograd node for the network.
    On the CPU it runs as one fused kernel, blocks of rows through every layer while they are
    in cache.

    bias=False gives layers without a bias (the parameters of the same stack of
    nn.Linear(bias=False)). output_activation (one of the activations, leaky_relu with the
    same parameters, or None) follows the output layer.

    With checkpoint_every=k (problem 7.11) the op stores the output of every k-th hidden layer
    only and recomputes the others, a stretch of k layers at a time, during the backward:
    memory for about L/k + k layers' outputs instead of L, for one more forward pass.

    Hooks registered on a layer keep firing: while any layer has hooks, or is wrapped
    (torch.distributed's checkpoint_wrapper, FSDP1, any module in its place) or reparametrized,
    the network calls its layers as modules, one by one (and without checkpointing), so that
    each hook and wrapper does its job. Under FSDP2 that is the case when each layer is
    `fully_shard`ed: each layer's hook gathers its own parameters just before it runs, which
    one op for the whole network cannot wait for; sharding only the root keeps the one op.
    """

    # softplus's parameters for a network pickled whole before MLP took them.
    beta, threshold = 1.0, 20.0

    def __init__(self, sizes, activation="relu", negative_slope=0.01, checkpoint_every=None, *,
                 bias=True, output_activation=None, beta=1.0, threshold=20.0, device=None, dtype=None):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least the input and output sizes, got {sizes}")
        HF.check_checkpoint_every(checkpoint_every)
        self.activation = HF.check_activation(activation)
        self.negative_slope = HF.check_negative_slope(negative_slope)
        self.beta, self.threshold = HF.check_softplus(beta, threshold)
        self.output_activation = HF.check_output_activation(output_activation)
        extra = ({"negative_slope": self.negative_slope} if activation == "leaky_relu" else
                 {"approximate": "tanh"} if activation == "gelu_tanh" else
                 {"beta": self.beta, "threshold": self.threshold} if activation == "softplus" else {})
        self.hidden = nn.ModuleList(
            _FUSED_LAYERS[activation](d_in, d_out, bias=bias, device=device, dtype=dtype, **extra)
            for d_in, d_out in zip(sizes[:-2], sizes[1:-1])
        )
        self.output = nn.Linear(sizes[-2], sizes[-1], bias=bias, device=device, dtype=dtype)
        self.checkpoint_every = checkpoint_every

    def forward(self, input):
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        # _modules and _parameters directly: Module.__getattr__ would cost a tiny network
        # measurable time.
        layers = (*self._modules["hidden"]._modules.values(), self._modules["output"])
        if _global_hooks() or not all(map(_runs_in_the_op, layers)):
            return HF._layer_by_layer(input, layers, self.output_activation, self._activation_parameters())
        return _run_in_the_op(input, layers, self.activation, self._activation_parameters(),
                              self.output_activation, self.checkpoint_every or 0)

    def _activation_parameters(self):
        return (self.negative_slope, self.beta, self.threshold)

    def __prepare_scriptable__(self):
        """torch.jit.script compiles forward once, without Python's checks at each call: it
        decides now, as forward does at each call, whether the one op may stand for the
        layers (their hooks and wrappers are in place by then; TorchScript runs no global
        hooks). Where it may not, the compiled forward calls the layers. The module itself is
        returned (TorchScript puts what it gets in the parent's place)."""
        if all(map(_runs_in_the_op, (*self.hidden, self.output))):
            self.__dict__.pop("_script_calls_layers", None)
        else:
            self._script_calls_layers = True
        return self

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """forward under TorchScript (hasattr is decided as it compiles)."""
        if hasattr(self, "_script_calls_layers"):
            for layer in self.hidden:
                input = layer(input)
            input = self.output(input)
            output_activation = self.output_activation
            if output_activation is not None:
                input = torch.ops.handgrad.activation(input, output_activation, self.negative_slope, self.beta,
                                                      self.threshold)
            return input
        weights: List[Tensor] = []
        biases: List[Tensor] = []
        for layer in self.hidden:
            weights.append(layer.weight)
            bias = layer.bias
            if bias is not None:
                biases.append(bias)
        weights.append(self.output.weight)
        bias = self.output.bias
        if bias is not None:
            biases.append(bias)
        checkpoint_every = self.checkpoint_every
        return torch.ops.handgrad.mlp(input, weights, biases, self.activation, self.negative_slope,
                                      checkpoint_every if checkpoint_every is not None else 0,
                                      self.output_activation, self.beta, self.threshold)

    def extra_repr(self):
        parts = [f"checkpoint_every={self.checkpoint_every}"] if self.checkpoint_every else []
        if self.output_activation is not None:
            parts.append(f"output_activation={self.output_activation!r}")
        return ", ".join(parts)


_ACTIVATION_MODULES = {nn.ReLU: "relu", ReLU: "relu", nn.LeakyReLU: "leaky_relu",
                       LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", Sigmoid: "sigmoid",
                       nn.Tanh: "tanh", Tanh: "tanh", nn.SiLU: "silu", SiLU: "silu",
                       nn.GELU: "gelu", GELU: "gelu", nn.Softplus: "softplus", Softplus: "softplus"}


def _module_activation(module):
    """The activation name of an activation module (nn.GELU's by its approximate), or None."""
    name = _ACTIVATION_MODULES.get(type(module))
    if name == "gelu":
        return HF.gelu_activation(module.approximate)
    return name


for _class in (LinearReLU, LinearLeakyReLU, LinearSigmoid, LinearTanh, LinearSiLU, LinearGELU, LinearSoftplus,
               ReLU, LeakyReLU, Sigmoid, Tanh, SiLU, GELU, Softplus, MLP):
    _class.__module__ = "handgrad.nn"
