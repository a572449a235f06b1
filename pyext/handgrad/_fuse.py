"""fuse(): the Linear + activation pairs of a user's model, fused in place.

The model stays the user's object: its class, methods, attributes, buffers, hooks, and the
registration order of its modules and parameters are kept, and no Parameter is replaced,
so an optimizer built before (and its state, restored by position) keeps working.

- An nn.Sequential container whose members include a Linear followed by an activation
  module gets, as an instance attribute, a forward that runs its members in order with each
  such pair in one op, and a run of pairs with the Linear after them in MLP's one op
  (_FusedSequential). The members themselves stay as they are, so any
  other use of them (`seq[0](x)`, a slice, another method) computes what it did.
- Calls in forward (F.relu(self.fc(x)), ...) are found by torch.fx. The model gets, as an
  instance attribute, a forward with those pairs fused: one traced program for training and
  one for evaluation, chosen at call time by model.training, so nothing is frozen. The
  Linear modules themselves stay as they are, so the model's own methods (which call them
  directly) compute what they always did. Arguments that are None, a bool or a str in a
  call (`if mask is None:`) are traced as those values, a program for each set of values, and
  a program is traced again once a plain attribute its trace read (self.temperature) has
  changed, or a hook or module of a pair it fuses has (a hook registered since, a Linear
  wrapped by an adapter). A forward that branches on shapes is traced with the inputs'
  shapes known (and, where it reads them, those of what it computes), at its first call (or
  now, for example inputs), and again for each new input shape. A model whose forward
  cannot be fused as a whole has its submodules fused on their own.
"""

import contextlib
import copy
import dis
import functools
import gc
import inspect
import linecache
import logging
import operator
import random
import sys
import threading
import traceback
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.autograd.graph
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch import nn
from torch.nn.utils import parametrize

from . import _C
from . import functional as HF
from ._modules import (
    _FUSED_LAYERS,
    LeakyReLU,
    LinearLeakyReLU,
    LinearReLU,
    LinearSigmoid,
    LinearTanh,
    LinearSiLU,
    LinearGELU,
    ReLU,
    Sigmoid,
    Tanh,
    SiLU,
    GELU,
    LinearSoftplus,
    MLP,
    Softplus,
    _global_hooks,
    _has_hooks,
    _module_activation,
    _run_in_the_op,
    _runs_in_the_op,
)

_ACTIVATION_FUNCTIONS = {
    torch.relu: "relu", torch.relu_: "relu", torch.nn.functional.relu: "relu",
    torch.nn.functional.relu_: "relu", HF.relu: "relu",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", torch.nn.functional.sigmoid: "sigmoid",
    HF.sigmoid: "sigmoid",
    torch.tanh: "tanh", torch.tanh_: "tanh", torch.nn.functional.tanh: "tanh", HF.tanh: "tanh",
    torch.nn.functional.silu: "silu", HF.silu: "silu", torch.nn.functional.gelu: "gelu", HF.gelu: "gelu",
    torch.nn.functional.leaky_relu: "leaky_relu", torch.nn.functional.leaky_relu_: "leaky_relu",
    HF.leaky_relu: "leaky_relu", torch.nn.functional.softplus: "softplus", HF.softplus: "softplus",
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}
# The parameters each activation function takes after its input, positionally or by name,
# with their defaults, as F.leaky_relu and F.softplus take them.
_FUNCTION_PARAMETERS = {"leaky_relu": {"negative_slope": 0.01}, "softplus": {"beta": 1.0, "threshold": 20.0}}
_FUSED_TYPES = (LinearReLU, LinearLeakyReLU, LinearSigmoid, LinearTanh, LinearSiLU, LinearGELU, LinearSoftplus)
_HANDGRAD_MODULES = (*_FUSED_TYPES, ReLU, LeakyReLU, Sigmoid, Tanh, SiLU, GELU, Softplus, MLP)
_FUSED_CALLS = {"relu": HF.linear_relu, "sigmoid": HF.linear_sigmoid, "tanh": HF.linear_tanh,
                "silu": HF.linear_silu, "gelu": HF.linear_gelu,
                "gelu_tanh": lambda x, w, b: HF.linear_gelu(x, w, b, approximate="tanh")}
_MAX_SHAPES = 16  # traced programs kept per training mode, for a forward that branches on shapes

_log = logging.getLogger("handgrad.fuse")


class FusionDecision(NamedTuple):
    """What fuse() did with one nn.Linear: `name` is its qualified name in the model."""

    name: str
    fused: bool
    reason: str


FusionDecision.__module__ = "handgrad.nn"  # as users know it (repr, pickles)


# --- Which Linear layers can fuse ---

def _is_linear(module):
    """Whether module is an nn.Linear fuse() must decide on: not one of handgrad's own."""
    return isinstance(module, nn.Linear) and not isinstance(module, _FUSED_TYPES)


def _is_parametrized_linear(module):
    """nn.Linear under torch.nn.utils.parametrize (parametrizations.weight_norm,
    spectral_norm, ...): its class is a subclass parametrize made, which adds the property."""
    return parametrize.is_parametrized(module) and type(module).__bases__ == (nn.Linear,)


def _is_unmaterialized(module):
    """Whether module is a lazy module (nn.LazyLinear) whose first call has not come yet: it
    becomes its plain class (nn.Linear) then."""
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def _why_not_fusable(linear, activation_module=None):
    """Why linear (and its activation module) must stay as they are, or None.

    Forward pre-hooks see the input only (torch.nn.utils.weight_norm's recomputes the weight
    there), so they keep working on a fused layer; hooks that see the output or its gradient
    would see the activation's instead."""
    if _is_unmaterialized(linear):
        return ("it is an nn.LazyLinear that no call has given its shape yet (a call of the model fuses it "
                "where forward calls it; nn.Sequential pairs fuse with fuse() after a first call)")
    if type(linear) is not nn.Linear and not _is_parametrized_linear(linear):
        return f"{type(linear).__name__} is not nn.Linear itself"  # a subclass may change forward
    if linear._forward_hooks:
        return "it has a forward hook, which must keep seeing its own output"
    if linear._backward_hooks or linear._backward_pre_hooks:
        return "it has a backward hook, which must keep seeing its own output's gradient"
    if linear._forward_pre_hooks_with_kwargs:
        return "it has a forward pre-hook that takes keyword arguments"
    if activation_module is not None and _has_hooks(activation_module):
        return "its activation module has hooks"
    return None


def _saves_what_eager_does_not(activation, parameters, in_place):
    """Whether the fused layer saves for its backward the activation's output (it does where
    a' is read off the output: csrc/activation.h) where eager's activation saves its input
    (eager's ReLU, sigmoid and tanh save their output, and so does any in-place activation):
    LeakyReLU of slope >= 0. The fused layer's backward then fails where forward later
    changes that output in place, which eager's allows."""
    return (not in_place and activation not in _EAGER_SAVES_OUTPUT
            and not _C.derivative_needs_preactivation(activation, *parameters))


def _in_place_module(module):
    """Whether module writes its output into its input (nn.ReLU(inplace=True), nn.Dropout(inplace=True))."""
    # (read from the instance and its class: nn.Module's __getattr__ raises, slowly, for names it lacks)
    return module is not None and module.__dict__.get("inplace", getattr(type(module), "inplace", False)) is True


_EAGER_SAVES_OUTPUT = ("relu", "sigmoid", "tanh")


_CHANGED_IN_PLACE = ("its leaky_relu's output is changed in place afterwards, which the fused layer saves "
                     "for its backward (eager's LeakyReLU saves its input)")


# --- nn.Sequential: the pairs fused in the container's forward ---

def _sequential_pair(linear, activation, following):
    """Whether the members linear, activation (and following, the member after them, or None)
    of an nn.Sequential fuse: (the activation's name, its parameters, whether following
    writes in place), the reason they may not, or None where they are not a Linear and an
    activation module."""
    name = _module_activation(activation)
    if not _is_linear(linear) or name is None:
        return None
    reason = _why_not_fusable(linear, activation)
    if reason is not None:
        return reason
    parameters, following_in_place = _module_parameters(name, activation), _in_place_module(following)
    if following_in_place and _saves_what_eager_does_not(name, parameters, _in_place_module(activation)):
        return _CHANGED_IN_PLACE
    return name, parameters, following_in_place


@functools.lru_cache(maxsize=None)
def _fused_class(linear_class, activation):
    """handgrad's fused layer for a Linear of linear_class: LinearReLU, ..., or for a
    parametrized Linear a subclass of both, which keeps parametrize's property for the weight."""
    fused = _FUSED_LAYERS[activation]
    if linear_class is nn.Linear:
        return fused
    return type(f"{linear_class.__name__}{fused.__name__[len('Linear'):]}", (linear_class, fused),
                {"__module__": fused.__module__})


def _fused_copy(linear, activation, parameters):
    """A shallow copy of linear (its parameters shared) that computes activation(linear(x))."""
    fused = copy.copy(linear)
    fused.__class__ = _fused_class(type(linear), activation)
    if activation == "leaky_relu":
        fused.negative_slope = parameters[0]
    if activation == "softplus":
        fused.beta, fused.threshold = parameters[1:]
    if activation in ("gelu", "gelu_tanh"):
        fused.approximate = "tanh" if activation == "gelu_tanh" else "none"
    return fused


def _module_parameters(name, module):
    """The parameters (negative_slope, beta, threshold) of activation module `module`."""
    return HF.parameters_of(name, **{key: getattr(module, key) for key in _FUNCTION_PARAMETERS.get(name, ())})


def _runs_in_order(module):
    """Whether module is an nn.Sequential that runs its modules in order (nn.Sequential's own
    forward, not a subclass's)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _member_states(members):
    """What a container's plan (_FusedSequential) is decided by, read cheaply at each call:
    each member's class, which hooks it has, whether it holds its weight and a bias, and the
    attributes of an activation or in-place module (all _sequential_pair and _runs_in_the_op
    read)."""
    states = []
    for _, module in members:
        # (through __dict__: nn.Module's __getattr__ makes each attribute read slow)
        attributes = module.__dict__
        parameters = attributes["_parameters"]
        states.append((type(module), not attributes["_forward_hooks"], not attributes["_forward_pre_hooks"],
                       not attributes["_forward_pre_hooks_with_kwargs"],
                       not (attributes["_backward_hooks"] or attributes["_backward_pre_hooks"]),
                       "weight" in parameters, parameters.get("bias") is None,
                       # (one by one: a starred map over the names costs twice as much)
                       attributes.get("negative_slope"), attributes.get("beta"), attributes.get("threshold"),
                       attributes.get("approximate"), attributes.get("inplace")))
    return states


def _members(container):
    """[(key, module, the module after it, the one after that)] of container's members."""
    members = list(container._modules.items())
    after = [module for _, module in members[1:]] + [None, None]
    return [(key, module, after[index], after[index + 1]) for index, (key, module) in enumerate(members)]


def _fuse_sequentials(module, prefix, decisions, apply=True):
    """Decide on the pairs of every nn.Sequential in module that runs its members in order and
    (with apply) give each container with fusable pairs a forward that runs them fused."""
    if _runs_in_order(module):
        pairs = {}
        for key, linear, activation, following in _members(module):
            decided = _sequential_pair(linear, activation, following)
            if decided is None and _is_linear(linear):  # as a trace of forward says it
                decided = "nothing follows it" if activation is None else f"{type(activation).__name__} follows it"
            if isinstance(decided, str):
                decisions.append(FusionDecision(f"{prefix}{key}", False, decided))
            elif decided is not None:
                pairs[key] = decided
                decisions.append(FusionDecision(f"{prefix}{key}", True, f"fused with the {decided[0]} after it"))
        if apply:
            for name in _INSTALLED:  # fused before: decided again
                module.__dict__.pop(name, None)
            if pairs:
                _install(module, _FusedSequential(module, pairs))
    for child_name, child in module.named_children():
        _fuse_sequentials(child, f"{prefix}{child_name}.", decisions, apply)


class _InstalledForward:
    """What fuse() installs as a module's forward (self.model): tools read a forward's code's
    name and place (torch.export) and bind arguments by its signature, so both are those of
    the module's own forward; torch.jit.script compiles what for_script gives."""

    @property
    def __code__(self):
        return type(self.model).forward.__code__

    @property
    def __signature__(self):
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def for_script(self):
        return _unfused_copy(self.model)


class _FusedSequential(_InstalledForward):
    """The forward fuse() gives an nn.Sequential whose members include fusable Linear +
    activation pairs: its members in order, as nn.Sequential's forward runs them, each pair
    in one op, and a run of pairs with the Linear after them in handgrad.nn.MLP's one op
    (_network_at). The members stay as they were, so that any other use of them (`seq[0](x)`,
    `seq[:1]`, iterating over them, another method) computes what it did; this forward is
    the only thing fuse() changes. Each call runs the members as they stand: the plan (which
    pairs fuse, which run as one network) is kept with what it was decided by
    (_member_states), and decided again where a member, a hook or an activation's attribute
    has changed since (a Linear given a forward hook runs apart from its activation; a new
    slope fuses as it is)."""

    def __init__(self, container, pairs):
        # pairs: {the Linear's key: (activation, parameters, whether the member after the
        # activation writes in place)}, as _sequential_pair decided them
        self.model, self.pairs = container, pairs
        self.plan = None  # (the members, their _member_states, the steps that run them)

    def __call__(self, input):
        container = self.model
        if _global_hooks():  # registered for every module: they must see each module's call
            return type(container).forward(container, input)
        members = tuple(container._modules.items())
        plan = self.plan
        if plan is None or plan[0] != members or plan[1] != _member_states(members):
            plan = self.plan = (members, _member_states(members), self._steps(members))
        for step in plan[2]:
            input = step(input)
        return input

    def keep_apart(self, key):
        """Run the pair of the Linear at key as two modules from now on."""
        self.pairs.pop(key, None)
        self.plan = None

    def _steps(self, members):
        """Callables that run members in turn: a member itself, a pair in one op, or a run of
        pairs (with the Linear after it) in MLP's one op."""
        steps, index = [], 0
        while index < len(members):
            pair = self._pair_at(members, index)
            if pair is None:
                steps.append(members[index][1])
                index += 1
                continue
            layers, output_activation, end = self._network_at(members, index, pair)
            if layers is None:  # the Linear and the activation after it
                steps.append(functools.partial(_run_fused, members[index][1], activation=pair[0],
                                               parameters=pair[1]))
            else:  # hidden layers and an output layer: handgrad.nn.MLP's one op
                steps.append(functools.partial(_run_in_the_op, layers=tuple(layers), activation=pair[0],
                                               parameters=pair[1], output_activation=output_activation))
            index = end
        return steps

    def _pair_at(self, members, index):
        """The pair of members[index] and the member after it, as it fuses now, or None."""
        key = members[index][0]
        if key not in self.pairs or index + 1 >= len(members):
            return None
        following = members[index + 2][1] if index + 2 < len(members) else None
        decided = _sequential_pair(members[index][1], members[index + 1][1], following)
        return decided if isinstance(decided, tuple) else None

    def _network_at(self, members, index, pair):
        """Where the pair at index begins a network that MLP's one op runs as the members
        would: pairs of the same activation (and parameters), each Linear bare (no hooks, no
        parametrization, so the op may read its parameters), then a bare Linear as the output
        layer, or the last pair's Linear with its activation as the output activation. Its
        layers, the output activation (or None), and the index after it; (None, None, index
        after the pair) where there is no such network of two layers or more."""
        layers, end, next_pair = [], index, pair
        while end < len(members) and next_pair == pair and _runs_in_the_op(members[end][1]):
            layers.append(members[end][1])
            end += 2
            next_pair = self._pair_at(members, end) if end < len(members) else None
        output_activation = pair[0]
        if (next_pair is None and end < len(members) and type(members[end][1]) is nn.Linear
                and _runs_in_the_op(members[end][1])):
            layers.append(members[end][1])  # the output layer, without an activation
            output_activation, end = None, end + 1
        following = members[end][1] if end < len(members) else None
        if (len(layers) < 2 or _in_place_module(following)
                or len({layer._parameters["bias"] is None for layer in layers}) > 1):
            return None, None, index + 2
        return layers, output_activation, end

    def for_script(self):
        """The container's __prepare_scriptable__. TorchScript cannot run this forward
        (Python), so it compiles a shallow copy of the container whose pairs are handgrad's
        fused layers, each sharing its Linear's parameters, followed by nn.Identity: the
        same results, still fused."""
        scripted = _unfused_copy(self.model)
        scripted._modules = dict(scripted._modules)
        skip = False
        for key, module, activation, following in _members(self.model):
            if skip:
                scripted._modules[key], skip = nn.Identity(), False
            elif key in self.pairs and isinstance(pair := _sequential_pair(module, activation, following), tuple):
                scripted._modules[key], skip = _fused_copy(module, *pair[:2]), True
        return scripted

    def replicate_for_data_parallel(self):
        replica = type(self.model)._replicate_for_data_parallel(self.model)
        _install(replica, _FusedSequential(replica, self.pairs))
        return replica

    def __getstate__(self):
        return {"model": self.model, "pairs": self.pairs}

    def __setstate__(self, state):
        self.__dict__.update(state, plan=None)

    def __deepcopy__(self, memo):
        copied = _FusedSequential.__new__(_FusedSequential)
        memo[id(self)] = copied
        copied.__setstate__({"model": copy.deepcopy(self.model, memo), "pairs": dict(self.pairs)})
        return copied


# --- Calls in forward: traced programs ---

def _is_leaf_module(tracer, module, qualified_name):
    """handgrad's modules are kept whole, as torch.nn's are, and so is an nn.Sequential with
    pairs to fuse: the program calls it, and its own forward runs them (_FusedSequential)."""
    return (isinstance(module, _HANDGRAD_MODULES) or _has_sequential_pairs(module)
            or torch.fx.Tracer.is_leaf_module(tracer, module, qualified_name))


def _has_sequential_pairs(module):
    """Whether module is an nn.Sequential that runs its members in order, with a pair to fuse."""
    return _runs_in_order(module) and any(
        isinstance(_sequential_pair(linear, activation, following), tuple)
        for _, linear, activation, following in _members(module))


def _pair_saving_the_output(container, prefix):
    """The name of the Linear whose pair gives container's output (in the last nn.Sequential
    of nested ones) where the fused layer saves that output and eager's would not, or None."""
    members = _members(container)
    if not members:
        return None
    key, last = members[-1][:2]
    if _runs_in_order(last):
        return _pair_saving_the_output(last, f"{prefix}{key}.")
    if len(members) < 2:
        return None
    key, linear, activation, following = members[-2]
    pair = _sequential_pair(linear, activation, following)
    saves = isinstance(pair, tuple) and _saves_what_eager_does_not(pair[0], pair[1], _in_place_module(activation))
    return f"{prefix}{key}" if saves else None


def _fused_sequential(module):
    """The _FusedSequential fuse() gave module, or None."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, _FusedSequential) else None


class _FakeRun(threading.local):
    """Whether this thread runs ops on fake tensors for _ShapeTracer: meanwhile nothing is
    recorded, refused or traced (torch.fx's patches of nn.Module pass the calls through)."""

    active = False

    @contextlib.contextmanager
    def __call__(self):
        before, self.active = self.active, True
        try:
            yield
        finally:
            self.active = before


_FAKE_RUN = _FakeRun()


_IN_PLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
                       "iand", "ior", "ixor", "ilshift", "irshift")
_IN_PLACE_FUNCTIONS = frozenset(getattr(operator, name) for name in _IN_PLACE_OPERATORS) | {operator.setitem}


class _Proxy(torch.fx.Proxy):
    """torch.fx's Proxy, with `h += x` traced as the in-place operator.iadd that it is.
    torch.fx's own has no __iadd__, so Python traced h + x and bound h to it: the program then
    left unchanged a tensor that forward changes through a view (`v = h[:, :2]; v += 1`) or an
    input it changes for its caller. torch.fx writes such nodes back as `h += x`.

    Made into text (print(h.shape), logging, `str(x.device) == "cpu"`), it notes so: the
    program would print nothing, or have taken the branch on the text "Proxy(...)"."""

    def __repr__(self):
        if threading.get_ident() == getattr(self.tracer, "thread", None) and not _FAKE_RUN.active:
            self.tracer.formatted = True
        return super().__repr__()

    def __getattr__(self, name):  # h.shape, h.T: kept track of as the tracer's proxies are
        attribute = _Attribute(self, name)
        self.tracer.proxies.append(weakref.ref(attribute))
        return attribute


class _Attribute(torch.fx.proxy.Attribute, _Proxy):
    """torch.fx's Attribute (h.shape, h.T, h.mul_ before its call), with _Proxy's methods."""


def _in_place_operator(name):
    def method(self, other):
        return self.tracer.create_proxy("call_function", getattr(operator, name), (self, other), {})
    method.__name__ = f"__{name}__"
    return method


for _name in _IN_PLACE_OPERATORS:
    setattr(_Proxy, f"__{_name}__", _in_place_operator(_name))


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with handgrad's modules kept whole and in-place operators traced as
    such (_Proxy). While it traces, torch.fx patches nn.Module's __call__ and __getattr__ for
    every thread: other threads' modules (a server's other requests, the same model's
    included) run as usual."""

    is_leaf_module = _is_leaf_module

    def trace(self, root, concrete_args=None):
        self.thread, self.modes, self.proxies, self.formatted = threading.get_ident(), _modes(), [], False
        self.functions = {type(root).forward}  # the forwards that ran, for the globals they read
        before, generators, globals_before = _containers(root), _random_states(), _written_globals(root)
        try:
            with _refusing_unreplayable(self.thread):
                graph = super().trace(root, concrete_args)
        finally:  # undone whether or not the trace went through
            drew = _restore_random_states(generators)
            written = _restore_globals(globals_before)
            stored = _take_out_stored(self.proxies, before)
        if drew:
            raise _NotReplayable(_DRAWS_RANDOM)
        if written:
            raise _NotReplayable(f"forward sets the module globals {', '.join(written)}, which a traced "
                                 f"program would not")
        if stored:
            raise _NotReplayable(_STORES_TRACED)
        if self.formatted:
            raise _NotReplayable(_FORMATS_TRACED)
        return graph

    def proxy(self, node):
        proxy = _Proxy(node, self)
        self.proxies.append(weakref.ref(proxy))
        return proxy

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self.thread or _FAKE_RUN.active:
            return forward(*args, **kwargs)
        self.functions.add(type(m).forward)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self.thread or _FAKE_RUN.active:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # The program records no grad or autocast mode: a forward that switches one for part of
    # itself (`with torch.no_grad():` around a teacher network) is not replayed by it. The
    # switches are refused as they are entered (_refusing_unreplayable), even where they
    # change nothing at the trace (autocast(enabled=False) outside autocast), and any other
    # change of mode when it is seen.
    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if _modes() != self.modes:
            raise _NotReplayable(_MODE_SWITCH)
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)


def _containers(root):
    """The lists, dicts and sets root's modules hold, and the attributes of plain objects they
    hold (a SimpleNamespace of state), as they are (forward may store into them): {id: (the
    object, a copy)}; and the modules' own attribute dicts, {id: (the dict, None)}, which
    _AttributeAccess keeps (it undoes what forward sets)."""
    held = {}
    for module in root.modules():
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS:
                continue
            if not isinstance(value, (list, dict, set)) and type(getattr(value, "__dict__", None)) is dict and not (
                    isinstance(value, (nn.Module, torch.Tensor, type)) or callable(value)):
                value = vars(value)
            if isinstance(value, (list, dict, set)):
                held[id(value)] = (value, copy.copy(value))
    for module in root.modules():
        held.update((id(place), (place, None)) for place in (vars(module), *(
            vars(module).get(name, {}) for name in ("_parameters", "_buffers", "_modules"))))
    return held


def _random_states():
    """The states of Python's and NumPy's global random generators (NumPy's where imported)."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), None if numpy is None else numpy.random.get_state(legacy=False)


def _restore_random_states(states):
    """Put the generators back in states; whether either had drawn meanwhile."""
    python, numpy_state = states
    drew = random.getstate() != python
    random.setstate(python)
    if numpy_state is not None:
        numpy = sys.modules["numpy"]
        now = numpy.random.get_state(legacy=False)
        drew = drew or now["state"]["pos"] != numpy_state["state"]["pos"] or not numpy.array_equal(
            now["state"]["key"], numpy_state["state"]["key"]) or now["has_gauss"] != numpy_state["has_gauss"]
        numpy.random.set_state(numpy_state)
    return drew


def _take_out_stored(proxies, before):
    """Whether forward kept a traced value somewhere that outlives the call
    (self.features.append(h), a dict, a list of the module's globals, a tuple in one): a
    traced program would not store it, and the store holds torch.fx's Proxy instead of a
    tensor. The modules' lists, dicts and sets are then put back as they were (`before`, from
    _containers); other lists, dicts and sets lose what holds the Proxy."""
    if not any(proxy() is not None for proxy in proxies):
        return False
    gc.collect()  # what a cycle held dies with the trace
    stored = False
    for reference in proxies:
        proxy = reference()  # (not gathered into a list, which would hold them itself)
        stored |= proxy is not None and _taken_out(proxy, before, set())
    if stored:
        for held, copied in before.values():
            if copied is not None:
                held.clear()
                (held.extend if isinstance(held, list) else held.update)(copied)
    return stored


def _taken_out(value, before, own, depth=3):
    """Whether value is held by a list, dict or set (or a tuple so held) that outlives the
    trace; taken out of those that are not in before. `own`: the ids of this search's own
    lists of referrers."""
    referrers = gc.get_referrers(value)
    own.add(id(referrers))
    stored = False
    for holder in referrers:
        if id(holder) in own:
            continue
        if id(holder) in before and before[id(holder)][0] is holder:
            stored |= before[id(holder)][1] is not None  # put back by the caller, or _AttributeAccess
        elif isinstance(holder, list):
            holder[:] = [item for item in holder if item is not value]
            stored = True
        elif isinstance(holder, dict):
            for key in [key for key, item in holder.items() if item is value]:
                del holder[key]
            stored = True
        elif isinstance(holder, set):
            holder.discard(value)
            stored = True
        elif isinstance(holder, tuple) and depth:  # self.history.append((h, y))
            stored |= _taken_out(holder, before, own, depth - 1)
    return stored


_DRAWS_RANDOM = ("forward draws from Python's or NumPy's random generator (random.random(), np.random), "
                 "which a traced program would have drawn once, at the trace")
_STORES_TRACED = ("forward stores what it computes where it outlives the call (self.features.append(h), "
                  "a dict, a global list), which a traced program would not")
_FORMATS_TRACED = ("forward makes text of what it computes (print(h.shape), logging, str(x.device)), which "
                   "a traced program would not")
_MODE_SWITCH = ("forward runs part of itself in another grad or autocast mode (torch.no_grad(), "
                "torch.autocast(...)), which a traced program would not")
_SAVED_TENSOR_HOOKS = ("forward runs part of itself under saved-tensor hooks (activation checkpointing "
                       "with torch.utils.checkpoint, offloading with save_on_cpu), which a traced "
                       "program would drop")
# What a traced program cannot replay, refused as it is entered: torch's context managers of
# those modes, and the method of each that switches the mode; and saved-tensor hooks, which
# torch.fx traces through: the program would keep every activation that checkpoint() frees
# (its non-reentrant form enters such hooks, in every torch version; the reentrant form runs
# the function under torch.no_grad(), refused already) or that save_on_cpu() moves.
_REFUSED = ((torch.no_grad, "__enter__", _MODE_SWITCH), (torch.enable_grad, "__enter__", _MODE_SWITCH),
            (torch.inference_mode, "__enter__", _MODE_SWITCH), (torch.set_grad_enabled, "__init__", _MODE_SWITCH),
            (torch.amp.autocast, "__enter__", _MODE_SWITCH),
            (torch.autograd.graph.saved_tensors_hooks, "__enter__", _SAVED_TENSOR_HOOKS))


@contextlib.contextmanager
def _refusing_unreplayable(thread):
    """While active, in thread, entering one of _REFUSED raises _NotReplayable."""
    saved = [(owner, name, vars(owner)[name], message) for owner, name, message in _REFUSED]

    def refusing(method, message):
        @functools.wraps(method)
        def switch(*args, **kwargs):
            if threading.get_ident() == thread and not _FAKE_RUN.active:
                raise _NotReplayable(message)
            return method(*args, **kwargs)
        return switch

    for owner, name, method, message in saved:
        setattr(owner, name, refusing(method, message))
    try:
        yield
    finally:
        for owner, name, method, _ in saved:
            setattr(owner, name, method)


# torch's functions that say what state ops run in. forward may branch on them (`if
# torch.is_grad_enabled():`); a trace records the values it read as guards (_AttributeAccess).
_STATE_QUERIES = tuple(name for name in (
    "is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled", "get_autocast_dtype",
    "is_autocast_cpu_enabled", "get_autocast_cpu_dtype", "get_autocast_gpu_dtype",
    "are_deterministic_algorithms_enabled", "is_deterministic_algorithms_warn_only_enabled",
    "get_num_threads", "get_default_dtype", "is_anomaly_enabled") if hasattr(torch, name))
_QUERY = {name: getattr(torch, name) for name in _STATE_QUERIES}  # torch's own, unpatched


def _modes():
    """The grad and autocast modes that ops run in."""
    return (_QUERY["is_grad_enabled"](), _QUERY["is_inference_mode_enabled"](),
            *((_QUERY["is_autocast_enabled"](device), _QUERY["get_autocast_dtype"](device))
              for device in ("cpu", "cuda")))


class _ShapedProxy(_Proxy):
    """A traced tensor whose shape is known (its fake tensor's): a branch on it, or a loop over
    its sizes, is taken as for the call's inputs."""

    fake: torch.Tensor

    @property
    def shape(self):
        return self.fake.shape

    @property
    def ndim(self):
        return self.fake.ndim

    def size(self, dim=None):
        return self.fake.size() if dim is None else self.fake.size(dim)

    def dim(self):
        return self.fake.dim()

    def __len__(self):
        return len(self.fake)


_FAKE_TENSOR_LOG = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet(logger):
    """logger silenced meanwhile (fake tensors log each op they cannot run; the trace
    expects some)."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


class _ShapeTracer(_Tracer):
    """The same, with the shapes of one call's arguments known, and with fakes, those of what
    forward computes from them: each op is run on fake tensors (no data, no effect on the
    model) as it is traced. The program is kept for those input shapes only."""

    def __init__(self, shapes, device, fakes):
        super().__init__()
        self.shapes, self.device = shapes, device
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fakes else None

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        fake = None
        if kind == "placeholder" and self.shapes.get(target, (None,))[0] is not None:
            shape, dtype = self.shapes[target]
            # Without fakes, a tensor on the meta device stands for the input: its shape only.
            with self.fake_mode or contextlib.nullcontext():
                fake = torch.empty(shape, dtype=dtype, device=self.device if self.fake_mode else "meta")
        elif kind in ("call_function", "call_method", "call_module") and self.fake_mode is not None:
            fake = self._run_fake(kind, target, args, kwargs)
        if isinstance(fake, torch.Tensor):
            proxy.__class__ = _ShapedProxy
            proxy.fake = fake
        return proxy

    def _run_fake(self, kind, target, args, kwargs):
        """What the op computes from the fakes of its arguments, or None where one is unknown
        or the op cannot run so (data-dependent shapes, hooks on a module)."""
        def fake_of(value):
            if isinstance(value, torch.fx.Proxy):
                if not isinstance(value, _ShapedProxy):
                    raise LookupError
                return value.fake
            return value

        try:
            args, kwargs = torch.fx.node.map_aggregate((args, kwargs), fake_of)
            with _FAKE_RUN(), _quiet(_FAKE_TENSOR_LOG), self.fake_mode:
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                module = self.root.get_submodule(target)
                if _has_hooks(module):
                    return None
                # The module's own parameters and buffers as fakes, so that its forward
                # (BatchNorm's counter) changes nothing real.
                state = {name: self.fake_mode.from_tensor(tensor) for name, tensor in
                         (*module.named_parameters(), *module.named_buffers())}
                return torch.func.functional_call(module, state, tuple(args), kwargs)
        except Exception:
            return None


class _Mode:
    """model and every submodule in one training mode, each flag restored afterwards."""

    def __init__(self, model, training):
        self.model, self.training = model, training

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)

    def __exit__(self, *exc):
        for module, flag in self.flags:
            module.training = flag


# --- Arguments that choose a branch ---
#
# torch.fx gives forward a proxy for each argument, and `mask is None` of a proxy is False: a
# program traced so would take the branch of a call that passes a mask, whichever call runs
# it. So the arguments that are None, a bool or a str in a call are traced as those values,
# and the values are part of the program's key: other values, another program.

def _forward_parameters(model):
    """The named parameters of type(model).forward after self, as (name, default, positional)."""
    parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]
    return tuple((p.name, p.default, p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
                 for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _branch_arguments(parameters, args, kwargs):
    """((name, value), ...) for the arguments of a call (defaults included) that are None, a
    bool or a str."""
    fixed = []
    for index, (name, default, positional) in enumerate(parameters):
        value = args[index] if positional and index < len(args) else kwargs.get(name, default)
        if value is None or isinstance(value, (bool, str)):
            fixed.append((name, value))
    return tuple(fixed)


_SPECIALIZATION_ASSERTS = (torch._assert, torch.fx._symbolic_trace._assert_is_none)


def _unspecialize(graph, fixed):
    """torch.fx, tracing with concrete_args, renames each fixed argument (mask becomes mask_1)
    and asserts its value in the program. The program's key holds the values, so the names
    are given back (for calls by keyword) and the asserts taken out."""
    renamed = {f"{name}_1": name for name, _ in fixed}
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target in renamed:
            node.target = renamed[node.target]
        elif (node.op == "call_function" and node.target in _SPECIALIZATION_ASSERTS
              and isinstance(node.args[1], str) and "has been specialized to have value" in node.args[1]):
            condition = node.args[0]
            graph.erase_node(node)
            if condition.op == "call_function" and not condition.users:
                graph.erase_node(condition)  # the `argument == value` the assert tested


# --- Attributes that forward reads ---
#
# torch.fx runs forward's Python once, so a plain attribute it reads (self.temperature, a
# flag self.use_head) goes into the program as the value it had then. Each program keeps
# what its trace read, and a call after one of them has changed traces forward again. An
# attribute forward sets (self.features = h, a VAE's self.kl, a counter) is not in the
# program at all: such a forward is not fused, and the trace's writes are undone.

# What fuse() puts in a model's __dict__: its fused forward, TorchScript's and nn.DataParallel's hooks.
_INSTALLED = ("forward", "__prepare_scriptable__", "_replicate_for_data_parallel")
_MODULE_INTERNALS = frozenset([*vars(nn.Module()), *_INSTALLED])
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.device, torch.dtype)
_MAX_RETRACES = 16  # traces after attributes changed, before a model's calls run unfused
_MAX_VARIANTS = 4  # programs kept per key, for the states a model's attributes and hooks go back to


def _snapshot(value):
    """A copy of a list, tuple, set or dict of plain values, to compare with later (it may be
    changed in place); None for anything else."""
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        return None
    return copy.copy(value) if all(type(item) in _PLAIN_VALUES for item in items) else None


_ABSENT = object()
_PROPERTY = object()  # a guard's snapshot for a property's value: read again to compare
_QUERIED = object()  # and for a state query's (torch.is_grad_enabled()): asked again
_GLOBAL = object()  # and for a module global's: read again


class _NotReplayable(Exception):
    """forward does something at each call that a traced program would not do: sets module
    attributes or globals, stores or prints what it computes, draws Python random numbers,
    runs part of itself in another mode or under saved-tensor hooks. The message says which."""


class _AttributeAccess:
    """While active, in this thread: the plain attributes (in a module's __dict__; not its
    parameters, buffers or submodules) and the properties with plain values (a device, a
    dtype) that code reads from any nn.Module, as (module, name, value, snapshot) guards,
    and the attributes it sets, which are undone on exit (it raises _NotReplayable then,
    naming them, where no other error is on its way)."""

    _lock = threading.RLock()  # one recording at a time (nn.DataParallel's threads trace too)

    def __enter__(self):
        self._lock.acquire()
        self.reads, self.writes, thread, fake_run = {}, [], threading.get_ident(), _FAKE_RUN
        # What was there: torch's own, or an outer recording's (a fused model's forward may
        # call a separately fused submodule, which traces at its first call).
        self.saved = nn.Module.__dict__.get("__getattribute__")
        self.saved_setattr = nn.Module.__dict__["__setattr__"]

        def reading(module, name, read=object.__getattribute__):
            value = read(module, name)
            if name not in _MODULE_INTERNALS and threading.get_ident() == thread and not fake_run.active:
                if name in read(module, "__dict__"):
                    self.reads.setdefault((id(module), name), (module, name, value, None))
                elif type(value) in _PLAIN_VALUES and isinstance(
                        inspect.getattr_static(type(module), name, None), property):
                    # A property's value (the model's device or dtype, read off its
                    # parameters), which changes with model.to(...).
                    self.reads.setdefault((id(module), name), (module, name, value, _PROPERTY))
            return value

        def querying(name, query):
            @functools.wraps(query)
            def recorded(*args, **kwargs):
                value = query(*args, **kwargs)
                if threading.get_ident() == thread and not fake_run.active:
                    key = (name, args, tuple(kwargs.items()))
                    self.reads.setdefault(key, (functools.partial(query, *args, **kwargs), f"torch.{name}()",
                                                value, _QUERIED))
                return value
            return recorded

        def writing(module, name, value):
            # Not torch.fx's own (the tensor constants it puts on the root module), nor the
            # training flags a trace inside this one sets and restores (a submodule fused
            # on its own, tracing at its first call).
            if (threading.get_ident() == thread and name not in _MODULE_INTERNALS and not fake_run.active
                    and not name.startswith("_tensor_constant")):
                places = (module.__dict__, module._parameters, module._buffers, module._modules)
                self.writes.append((module, name, [(place, place.get(name, _ABSENT)) for place in places]))
            self.saved_setattr(module, name, value)

        nn.Module.__getattribute__ = reading
        nn.Module.__setattr__ = writing
        self.saved_queries = {name: getattr(torch, name) for name in _STATE_QUERIES}
        for name, query in self.saved_queries.items():
            setattr(torch, name, querying(name, query))
        return self

    def __exit__(self, kind, error, trace):
        for name, query in self.saved_queries.items():
            setattr(torch, name, query)
        nn.Module.__setattr__ = self.saved_setattr
        if self.saved is None:
            del nn.Module.__getattribute__
        else:
            nn.Module.__getattribute__ = self.saved
        self._lock.release()
        for module, name, held in reversed(self.writes):  # undone, last first
            for place, value in held:
                if value is _ABSENT:
                    place.pop(name, None)
                else:
                    place[name] = value
        if self.writes and kind is None:
            names = ", ".join(dict.fromkeys(f"{type(module).__name__}.{name}" for module, name, _ in self.writes))
            raise _NotReplayable(f"forward sets {names}, which a traced program would not")

    @property
    def guards(self):
        return tuple((module, name, value, _snapshot(value) if kind is None else kind)
                     for module, name, value, kind in self.reads.values())


def _unchanged(guards):
    """Whether every attribute a trace read still has the value it read: equal where it is a
    plain value or a container of them, the same object otherwise."""
    for module, name, value, snapshot in guards:
        if snapshot is _QUERIED or snapshot is _GLOBAL:  # module: the query, or the module's globals
            current = module() if snapshot is _QUERIED else module.get(name, _ABSENT)
            if type(current) is not type(value) or current != value:
                return False
            continue
        if snapshot is _PROPERTY:
            try:
                current = getattr(module, name)
            except Exception:
                return False
            if type(current) is not type(value) or current != value:
                return False
            continue
        current = module.__dict__.get(name, _ABSENT)
        if snapshot is not None or isinstance(value, _PLAIN_VALUES):
            if type(current) is not type(value) or current != (value if snapshot is None else snapshot):
                return False
        elif current is not value:
            return False
    return True


def _trace(model, training, shapes, fixed):
    """The graph of type(model).forward in one training mode, with the arguments in fixed
    ((name, value) pairs) taken as those values, and the guards of the attributes it read;
    with shapes (for each positional argument, (shape, dtype), or (None, None) for a
    non-tensor), traced for the inputs' shapes."""
    concrete = dict(fixed) or None
    with _Mode(model, training), warnings.catch_warnings(), _AttributeAccess() as access:
        warnings.simplefilter("ignore")  # fx's and the meta tracer's notes on what they skip
        if shapes is None:
            tracer = _Tracer()
            graph = tracer.trace(model, concrete_args=concrete)
        else:
            names = list(inspect.signature(type(model).forward).parameters)[1:]
            tensors = [*model.parameters(), *model.buffers()]
            device = tensors[0].device if tensors else "cpu"
            try:  # the inputs' shapes are enough for most (a branch on them)
                tracer = _ShapeTracer(dict(zip(names, shapes)), device, fakes=False)
                graph = tracer.trace(model, concrete_args=concrete)
            except _NotReplayable:
                raise
            except Exception:  # fake tensors too (importing what they need takes seconds, once)
                tracer = _ShapeTracer(dict(zip(names, shapes)), device, fakes=True)
                graph = tracer.trace(model, concrete_args=concrete)
    _unspecialize(graph, fixed)
    return graph, access.guards + _global_guards(tracer.functions)


def _user_codes(function):
    """The code of a user's function (not torch's) and the code defined in it (functions,
    comprehensions, lambdas); none for anything else."""
    code = getattr(function, "__code__", None)
    if code is None or getattr(function, "__module__", "").startswith("torch."):
        return []
    codes = [code]
    for code in codes:  # grows as it goes
        codes.extend(constant for constant in code.co_consts if inspect.iscode(constant))
    return codes


@functools.lru_cache(maxsize=None)
def _globals_written_by(function):
    """The global names that function's code assigns or deletes."""
    return frozenset(instruction.argval for code in _user_codes(function) for instruction in dis.get_instructions(code)
                     if instruction.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"))


def _written_globals(root):
    """(namespace, name, value) of each module global that a forward of root's modules
    assigns (`global CALLS; CALLS += 1`), as it is before a trace runs them."""
    found = {}
    for forward in {type(module).forward for module in root.modules()}:
        for name in _globals_written_by(forward):
            found[(id(forward.__globals__), name)] = (forward.__globals__, name,
                                                      forward.__globals__.get(name, _ABSENT))
    return tuple(found.values())


def _restore_globals(before):
    """Put back the globals a trace changed; their names."""
    written = []
    for namespace, name, value in before:
        if namespace.get(name, _ABSENT) is not value:
            written.append(name)
            if value is _ABSENT:
                namespace.pop(name, None)
            else:
                namespace[name] = value
    return written


def _global_guards(functions):
    """Guards for the module globals of plain value (a flag, `USE_SKIP = True`) that the code
    of functions (and the functions, comprehensions and lambdas defined in it) names: the
    program holds the values the trace read, as it does attributes'."""
    guards = {}
    for function in functions:
        for code in _user_codes(function):
            for name in code.co_names:
                value = function.__globals__.get(name, _ABSENT)
                if type(value) in _PLAIN_VALUES:
                    guards[(id(function.__globals__), name)] = (function.__globals__, name, value, _GLOBAL)
    return tuple(guards.values())


def _activation_of(node, modules):
    """(activation, parameters) that node applies to its first argument, or (None, why)."""
    if node.op == "call_module":
        module = modules[node.target]
        name = _module_activation(module)
        if name is None:
            return None, f"{type(module).__name__} follows it"
        if _has_hooks(module):
            return None, "its activation module has hooks"
        return name, _module_parameters(name, module)
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        if name == "gelu":  # F.gelu(x, approximate=...)
            approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
            if approximate not in ("none", "tanh"):
                return None, "its gelu's approximate is computed at run time or unknown"
            return HF.gelu_activation(approximate), HF.DEFAULT_PARAMETERS
        values = {}
        for position, (key, default) in enumerate(_FUNCTION_PARAMETERS.get(name, {}).items(), 1):
            value = node.args[position] if len(node.args) > position else node.kwargs.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return None, f"its {name}'s {key} is computed at run time"
            values[key] = value
        return name, HF.parameters_of(name, **values)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return _ACTIVATION_METHODS[node.target], HF.DEFAULT_PARAMETERS
    if node.op == "output":
        return None, "nothing follows it"
    target = getattr(node.target, "__name__", node.target)
    return None, f"{target} follows it"


# Ops whose result may share its first argument's memory, by name (methods and torch functions
# alike); a change in place to the result changes the argument.
_VIEWS = frozenset((
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "t", "permute",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unbind", "split", "chunk",
    "tensor_split", "hsplit", "vsplit", "dsplit", "movedim", "moveaxis", "swapaxes", "swapdims",
    "diagonal", "unfold", "as_strided", "contiguous", "detach", "alias", "getitem", "__getitem__",
    "T", "mT", "H", "mH", "real", "imag", "data", "to", "type", "type_as", "float", "double", "half",
    "bfloat16", "cpu", "cuda", "view_as_real", "view_as_complex", "identity", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"))
# Modules that may return their input itself (nn.Dropout in eval mode).
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _op_name(node):
    if node.op == "call_method":
        return node.target
    if node.target is getattr and len(node.args) > 1:
        return node.args[1]  # h.T, h.data
    return getattr(node.target, "__name__", None)


def _writes_its_input(node, modules):
    """Whether node changes its first argument in place: `h += x`, h.mul_(2), torch.relu_(h),
    F.dropout(h, inplace=True), nn.LeakyReLU(inplace=True), h[i] = x."""
    if node.op == "call_module":
        return _in_place_module(modules.get(node.target))
    if node.op not in ("call_method", "call_function") or not node.args:
        return False
    name = _op_name(node)
    if node.op == "call_function":
        if node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        try:  # F.dropout(h, 0.5, True, True): inplace by position
            if inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True:
                return True
        except (TypeError, ValueError):
            pass
    return (isinstance(name, str) and name.endswith("_") and not name.startswith("_")
            and name not in ("requires_grad_", "share_memory_"))


def _changed_in_place(graph, modules):
    """The nodes of graph whose values forward changes in place afterwards, directly or through
    a view of them (`v = h.view(-1); v.add_(1)`)."""
    shares = {}  # node: the nodes whose memory its value may share
    changed = set()
    for node in graph.nodes:
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        aliases = {node}
        writes = first is not None and _writes_its_input(node, modules)
        if writes or (first is not None and (_op_name(node) in _VIEWS or (
                node.op == "call_module" and isinstance(modules.get(node.target), _VIEW_MODULES)))):
            aliases |= shares.get(first, {first})
            if writes:
                changed |= aliases
        shares[node] = aliases
    return changed


def _pairs(graph, model):
    """The fusable Linear + activation pairs of a graph, {linear name: (activation, parameters,
    linear node, activation node)}, and the reasons for every other Linear."""
    modules = dict(model.named_modules())
    pairs, reasons, seen = {}, {}, set()
    changed = None
    for node in graph.nodes:
        if node.op != "call_module" or not _is_linear(modules.get(node.target)):
            continue
        reason = _why_not_fusable(modules[node.target])
        users = list(node.users)
        if reason is None and node.target in seen:
            reason = "it is called more than once"
        if reason is None and len(users) != 1:
            reason = "nothing follows it" if not users else f"its output is used {len(users)} times"
        if reason is None:
            activation, parameters_or_why = _activation_of(users[0], modules)
            if activation is None:
                reason = parameters_or_why
            elif users[0].args[:1] != (node,) or node.kwargs:
                reason = "its output is not the activation's input"
            elif _saves_what_eager_does_not(activation, parameters_or_why, _writes_its_input(users[0], modules)):
                changed = _changed_in_place(graph, modules) if changed is None else changed
                if users[0] in changed:
                    reason = _CHANGED_IN_PLACE
        seen.add(node.target)
        if reason is None:
            pairs[node.target] = (activation, parameters_or_why, node, users[0])
        else:
            reasons[node.target] = reason
            pairs.pop(node.target, None)
    return pairs, reasons


def _submodule(model, path):
    """The module at path (a tuple of names) under model, or None."""
    for name in path:
        if model is None:
            return None
        model = model._modules.get(name)
    return model


def _fused_modules(pairs, reasons, model):
    """What a program's fusion rests on: the paths of the Linear layers it fuses; for each
    activation module it fuses, (its path, its activation, its parameters); and the paths of
    the Linear layers it leaves unfused for a reason of their own (a hook), which may go."""
    held = tuple(tuple(name.split(".")) for name in reasons
                 if _why_not_fusable(model.get_submodule(name)) is not None)
    modules = {node.target: (tuple(node.target.split(".")), activation, parameters)
               for activation, parameters, _, node in pairs.values() if node.op == "call_module"}
    return tuple(tuple(name.split(".")) for name in pairs), tuple(modules.values()), held


def _still_fusable(model, fused_modules):
    """Whether the pairs a program fuses may still be fused as they were traced: no hook
    registered on their modules since, no module replaced by another kind (a LoRA wrapper),
    no activation module changed (its slope, or nn.Tanh in its place). The program calls
    neither module, so it would skip the hook or the new module."""
    linear_paths, activation_modules, held_paths = fused_modules
    for path in linear_paths:
        linear = _submodule(model, path)
        if not isinstance(linear, nn.Linear) or _why_not_fusable(linear) is not None:
            return False
    for path in held_paths:  # its hook removed: a variant that fuses it may run
        linear = _submodule(model, path)
        if isinstance(linear, nn.Linear) and _why_not_fusable(linear) is None:
            return False
    for path, activation, parameters in activation_modules:
        module = _submodule(model, path)
        if (_module_activation(module) != activation or _has_hooks(module)
                or _module_parameters(activation, module) != parameters):
            return False
    return True


def _run_fused(linear, input, activation, parameters):
    """linear followed by activation, in one op: the module's forward pre-hooks first
    (torch.nn.utils.weight_norm recomputes the weight there), then the weight as the module
    computes it (a parametrization's property included)."""
    for hook in linear._forward_pre_hooks.values():
        result = hook(linear, (input,))
        if result is not None:
            input = result[0] if isinstance(result, tuple) else result
    if activation == "leaky_relu":
        return HF.linear_leaky_relu(input, linear.weight, linear.bias, parameters[0])
    if activation == "softplus":
        return HF.linear_softplus(input, linear.weight, linear.bias, *parameters[1:])
    return _FUSED_CALLS[activation](input, linear.weight, linear.bias)


def _program(graph, pairs, label):
    """The Python function forward(self, ...) of graph with its pairs fused."""
    for name, (activation, parameters, linear_node, activation_node) in pairs.items():
        with graph.inserting_before(linear_node):
            module = graph.get_attr(name)
            fused = graph.call_function(_run_fused, (module, linear_node.args[0], activation, parameters))
        activation_node.replace_all_uses_with(fused)
        graph.erase_node(activation_node)
        graph.erase_node(linear_node)
    code = graph.python_code(root_module="self")
    filename = f"<handgrad.fuse: {label}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 (torch.fx's own code)
    return namespace["forward"]


def _shapes_of(args):
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else (None, None) for a in args)


def _unfused_copy(model):
    """The __prepare_scriptable__ fuse() gives a model: what torch.jit.script compiles in its
    place. TorchScript cannot run handgrad's fused forwards (Python), so it gets a shallow copy
    of the model without one and compiles the class's own forward: the same results, unfused."""
    scripted = copy.copy(model)
    for name in _INSTALLED:
        scripted.__dict__.pop(name, None)
    prepare = getattr(type(scripted), "__prepare_scriptable__", None)
    return scripted if prepare is None else prepare(scripted)


class _FusedForward(_InstalledForward):
    """The forward fuse() gives a model with fusable calls in its forward: a traced program
    per training mode and values of the arguments that choose a branch (None, bools and
    strings), and per input shapes where the forward branches on shapes, chosen at call time.
    A forward that torch.fx cannot trace without its inputs' shapes (a branch on them) is
    traced at its first call, with the real inputs' shapes, and again for each new signature.
    A program is traced again where an attribute its trace read (self.temperature), or a
    hook or module of a pair it fuses, is not as any of the key's last _MAX_VARIANTS traces
    found it; after _MAX_RETRACES such traces, the model's calls run unfused, with a warning.
    Pickled and deep-copied with the model; the programs are traced again, for the copy, on
    its first call."""

    def __init__(self, model, by_shape, programs):
        # key: [(program, the guards of the attributes its trace read, _fused_modules of its
        # pairs)], the variants traced for the states the model was called in, newest first
        self.model, self.by_shape, self.programs = model, by_shape, programs
        self.parameters = _forward_parameters(model)
        self.warned, self.retraces = False, 0

    def current(self, key):
        """The variant for key whose guards hold and whose pairs may still be fused, or None."""
        for entry in self.programs.get(key, ()):
            if _unchanged(entry[1]) and _still_fusable(self.model, entry[2]):
                return entry
        return None

    def program(self, key, shapes):
        """The traced program for key, made on first use or when an attribute its trace read
        (or a hook or module of a pair) is not as any variant traced before found it; None
        where there is nothing to fuse, or it cannot be traced, or its attributes keep changing
        (the model's own forward runs then)."""
        entry = self.current(key)
        if entry is not None:
            return entry[0]
        if key in self.programs:  # an attribute its trace read, or a module it fuses, has changed
            self.retraces += 1
            if self.retraces == _MAX_RETRACES + 1:
                read = sorted({guard[1] for entries in self.programs.values() for entry in entries
                               for guard in entry[1]})
                warnings.warn(f"handgrad.nn.fuse: {type(self.model).__name__}'s traced programs keep going "
                              f"stale: attributes its forward reads ({', '.join(read) or 'none'}), or the hooks "
                              f"or modules of the layers it fuses, keep changing; its calls run unfused from "
                              f"now on.", stacklevel=4)
        if self.retraces > _MAX_RETRACES:
            return None
        if len(self.programs) >= 2 * _MAX_SHAPES:
            self.programs.clear()
        try:
            graph, guards = _trace(self.model, key[0], shapes, key[1])
            pairs, reasons = _pairs(graph, self.model)
            fused_modules = _fused_modules(pairs, reasons, self.model)
            program = _program(graph, pairs, f"{type(self.model).__name__}, {key}") if pairs else None
            entry = (program, guards, fused_modules)
        except Exception as error:  # not traceable for these inputs: the model's own forward
            entry = (None, (), ((), (), ()))
            if not self.warned:  # once per model: every later call runs as it did
                self.warned = True
                _fuse_children(self.model, [], apply=True)
                warnings.warn(_untraceable_message(self.model, error, "even for its inputs' shapes"),
                              stacklevel=5)
        self.programs[key] = [entry, *self.programs.get(key, ())][:_MAX_VARIANTS]
        return entry[0]

    def __call__(self, *args, **kwargs):
        model = self.model
        if _global_hooks():  # registered for every module: they must see each module's call
            return type(model).forward(model, *args, **kwargs)
        key = (model.training, _branch_arguments(self.parameters, args, kwargs))
        shapes = None
        if self.by_shape:
            shapes = _shapes_of(args)
            key = (*key, shapes)
        if (self.by_shape and kwargs) or (torch.compiler.is_compiling() and not self.current(key)):
            # Keyword arguments where the program depends on shapes (taken from positional
            # ones), or a trace due inside torch.compile (which traces forward itself): the
            # model's own forward.
            return type(model).forward(model, *args, **kwargs)
        program = self.program(key, shapes)
        if program is None:
            return type(model).forward(model, *args, **kwargs)
        return program(model, *args, **kwargs)

    def replicate_for_data_parallel(self):
        """The model's _replicate_for_data_parallel: nn.DataParallel's replica for one device,
        with a fused forward of its own that runs the same programs on the replica (whose
        parameters are the copies on that device). The class's own replica would keep this
        forward, which runs the original model."""
        replica = type(self.model)._replicate_for_data_parallel(self.model)
        fused = _FusedForward.__new__(_FusedForward)
        fused.__dict__.update(self.__dict__, model=replica)  # the programs shared
        _install(replica, fused)
        return replica

    def __getstate__(self):
        return {"model": self.model, "by_shape": self.by_shape}

    def __setstate__(self, state):
        self.__dict__.update(state, programs={}, parameters=_forward_parameters(state["model"]), warned=False,
                             retraces=0)

    def __deepcopy__(self, memo):
        copied = _FusedForward.__new__(_FusedForward)
        memo[id(self)] = copied
        copied.__setstate__({"model": copy.deepcopy(self.model, memo), "by_shape": self.by_shape})
        return copied


def _traced_line(error):
    """Where in the user's code tracing stopped: 'file:line: code'."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/torch/" not in f.filename and "/handgrad/" not in f.filename]
    if not frames:
        return "in forward"
    frame = frames[-1]
    return f"at {frame.filename}:{frame.lineno}: {frame.line}"


def _untraceable_message(model, error, when):
    why = (f"{type(model).__name__}'s {error}" if isinstance(error, _NotReplayable) else
           f"torch.fx cannot trace {type(model).__name__} {when} ({type(error).__name__}: {error}) "
           f"{_traced_line(error)}")
    return (f"handgrad.nn.fuse: {why}; its own calls run unfused. Linear + activation pairs inside "
            "nn.Sequential containers, and the calls of its submodules that have a forward of their "
            "own (each traced on its own), are fused.")


def _fuse_children(model, decisions, apply, prefix="", seen=None):
    """Where model's forward cannot be fused as a whole (untraceable, or not replayable): each
    submodule with a forward of its own, fused on its own, so that its calls fuse when
    model's forward calls it (a VAE that stores its KL term keeps fused encoder and decoder;
    blocks under activation checkpointing fuse inside the checkpoint). Containers are looked
    into; torch's and handgrad's own modules are left as they are. A submodule that cannot be
    fused either is looked into in turn, without a warning of its own: its decisions say why."""
    seen = set() if seen is None else seen
    for name, child in model.named_children():
        if id(child) in seen or isinstance(child, (_HANDGRAD_MODULES, nn.Linear)):
            continue
        seen.add(id(child))
        path = f"{prefix}{name}"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or _runs_in_order(child):
            _fuse_children(child, decisions, apply, f"{path}.", seen)
        elif not type(child).__module__.startswith("torch."):
            found = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _fuse_calls(child, None, found, apply)
            decisions.extend(FusionDecision(f"{path}.{d.name}", d.fused, d.reason) for d in found)


def _install(model, fused_forward):
    """Give model its fused forward, torch.jit.script what it compiles instead, and
    nn.DataParallel replicas with fused forwards of their own."""
    model.forward = fused_forward
    model.__prepare_scriptable__ = fused_forward.for_script
    model._replicate_for_data_parallel = fused_forward.replicate_for_data_parallel


def _leave_undecided_unfused(model, decisions, reason):
    """A decision not to fuse, for reason, for each Linear of model that has none yet."""
    decided = {d.name for d in decisions}
    decisions.extend(FusionDecision(name, False, reason) for name, module in model.named_modules()
                     if _is_linear(module) and name not in decided)


def _fuse_calls(model, example_inputs, decisions, apply=True):
    """Install a fused forward on model (with apply) if its forward calls fusable pairs, or
    may (one that can be traced only with its inputs' shapes known, at its first call)."""
    shapes = None if example_inputs is None else _shapes_of(tuple(example_inputs))
    # The call fuse() plans for: example_inputs, or the required arguments and the defaults.
    fixed = _branch_arguments(_forward_parameters(model), tuple(example_inputs or ()), {})
    try:
        traced = {training: _trace(model, training, None, fixed) for training in (True, False)}
        by_shape = False
    except Exception as error:  # torch.fx raises many kinds for untraceable code
        if isinstance(error, _NotReplayable):  # whatever the shapes
            _fuse_children(model, decisions, apply)
            _leave_undecided_unfused(model, decisions, f"{type(model).__name__}'s {error}")
            warnings.warn(_untraceable_message(model, error, ""), stacklevel=3)
            return
        if shapes is None:
            # Perhaps a branch on the inputs' shapes: traced at the first call, with them.
            _leave_undecided_unfused(model, decisions, (
                f"decided at the first call: torch.fx cannot trace forward without its inputs' shapes "
                f"({type(error).__name__} {_traced_line(error)}); example_inputs=(...) decides now"))
            if apply:
                _install(model, _FusedForward(model, True, {}))
            return
        try:
            traced = {training: _trace(model, training, shapes, fixed) for training in (True, False)}
            by_shape = True
        except Exception as shaped_error:
            _fuse_children(model, decisions, apply)
            _leave_undecided_unfused(model, decisions, (
                f"torch.fx cannot trace {type(model).__name__}'s forward ({type(shaped_error).__name__} "
                f"{_traced_line(shaped_error)})"))
            warnings.warn(_untraceable_message(model, shaped_error, "even for the shapes of example_inputs"),
                          stacklevel=3)
            return
    found = {training: _pairs(graph, model) for training, (graph, _) in traced.items()}
    names = dict.fromkeys([*found[True][0], *found[True][1], *found[False][0], *found[False][1]])
    # The pairs of nn.Sequential containers are the containers' own to run (_FusedSequential):
    # a Linear of theirs that forward also calls apart is plain there. Where forward changes
    # a container's output in place and its last pair saves that output, the pair runs apart.
    decided_in_containers = {d.name for d in decisions}
    names = [name for name in names if name not in decided_in_containers]
    modules = dict(model.named_modules())
    for graph, _ in traced.values():
        for node in _changed_in_place(graph, modules):
            if node.op != "call_module" or not _runs_in_order(modules.get(node.target)):
                continue
            name = _pair_saving_the_output(modules[node.target], f"{node.target}.")
            if name is not None:
                decisions[:] = [d for d in decisions if d.name != name]
                decisions.append(FusionDecision(name, False, _CHANGED_IN_PLACE))
                if apply:
                    _keep_apart_in_sequential(model, name)
    for name in names:
        in_train, in_eval = name in found[True][0], name in found[False][0]
        if in_train or in_eval:
            activation = (found[True][0] if in_train else found[False][0])[name][0]
            when = "" if in_train and in_eval else (" in training mode only" if in_train else " in eval mode only")
            decisions.append(FusionDecision(name, True, f"fused with the {activation} after it{when}"))
        else:
            decisions.append(FusionDecision(name, False, found[True][1].get(name) or found[False][1][name]))
    # (A LazyLinear not yet materialized: the forward is installed, runs the model's own
    # calls, and traces again once the first call has made it an nn.Linear.)
    if apply and (any(found[training][0] for training in (True, False))
                  or any(_is_unmaterialized(module) for module in model.modules())):
        # Both programs made now, so that torch.compile finds them made.
        programs = {}
        for training, (graph, guards) in traced.items():
            pairs = found[training][0]
            fused_modules = _fused_modules(pairs, found[training][1], model)
            program = _program(graph, pairs, f"{type(model).__name__}, training={training}") if pairs else None
            programs[(training, fixed, *((shapes,) if by_shape else ()))] = [(program, guards, fused_modules)]
        _install(model, _FusedForward(model, by_shape, programs))


def _keep_apart_in_sequential(model, name):
    """The pair of the Linear at name, if an nn.Sequential's fused forward runs it, run apart."""
    prefix, _, key = name.rpartition(".")
    fused = _fused_sequential(model.get_submodule(prefix) if prefix else model)
    if fused is not None:
        fused.keep_apart(key)


def _fuse_model(model, example_inputs, decisions, apply):
    """fuse()'s decisions for model, carried out with apply. An nn.Sequential that runs its
    members in order is its own fused forward: the members with a forward of their own are
    fused on their own."""
    _fuse_sequentials(model, "", decisions, apply)
    if _runs_in_order(model):
        _fuse_children(model, decisions, apply)
    else:
        _fuse_calls(model, example_inputs, decisions, apply)


def fuse(model, example_inputs=None, *, verbose=False, inplace=True):
    """Fuse every nn.Linear followed by ReLU, LeakyReLU, Sigmoid, Tanh, SiLU or GELU in model, in place, and
    return model (with inplace=False, a deep copy, fused).

    The activation may be a module (nn.ReLU(inplace=True) included) or a call in forward:
    F.relu, torch.relu, x.relu(), torch.sigmoid, F.leaky_relu with its slope, and handgrad's
    own. The model keeps its class, methods, attributes, parameter objects and their order,
    so optimizers and their checkpoints keep working, and state_dicts load both ways.

    - An nn.Sequential container runs each such pair in one op, and a run of pairs of one
      activation with the Linear after them as MLP's one op: it gets a forward of its own,
      and its members stay as they are, so code that uses them apart (`seq[0](x)`, slices)
      computes what it did (not a subclass with a forward of its own: its calls fuse as
      calls).
    - Calls in forward are found by torch.fx, in training and in eval mode; the model gets a
      forward that runs the traced program of its current mode, so dropout, `if
      self.training:` branches and model.train()/eval() behave as before. The arguments of a
      call that are None, a bool or a str (`if mask is None:`, a flag) are traced as those
      values: a program for each set of values, made at its first call. A call after an
      attribute that forward read has changed (self.temperature) traces forward again.
    - A forward that branches on input shapes (DeepSDF's decoder) is traced at its first call,
      with the real inputs' shapes, and again for each new shape; with example_inputs (a
      tuple of the forward's positional arguments) it is traced now, for their shapes.
    - Weight norm (torch.nn.utils.weight_norm, parametrizations.weight_norm, spectral_norm and
      other parametrizations) fuses: the fused op reads the weight as the module computes it.
    - Left unfused: a Linear subclass; a Linear with forward or backward hooks (they must keep
      seeing its own output); an activation module with hooks; a Linear whose output is used
      more than once, or that forward calls more than once; a LeakyReLU whose output forward
      changes in place afterwards (the fused layer saves it for its backward, eager's saves
      the input). A model torch.fx cannot trace even with its inputs' shapes known
      (data-dependent control flow), or whose forward a traced program cannot replay (it
      sets attributes or module globals, stores or prints what it computes, draws Python or NumPy random
      numbers, switches grad or autocast mode, checkpoints), runs its own calls
      unfused, with one warning naming why; its nn.Sequential containers and its submodules
      with a forward of their own are fused on their own.

    Each decision, with its reason, is logged to the "handgrad.fuse" logger; verbose=True
    prints them.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model.__dict__.get("forward"), (_FusedForward, _FusedSequential)):
        for name in _INSTALLED:  # fused before: trace the model's own forward again
            model.__dict__.pop(name, None)
    decisions = []
    _fuse_model(model, example_inputs, decisions, apply=True)
    for decision in sorted(set(decisions)):
        _log.info("%s: %s (%s)", decision.name, "fused" if decision.fused else "not fused", decision.reason)
        if verbose:
            print(f"handgrad.nn.fuse: {decision.name}: {'fused' if decision.fused else 'not fused'}, "
                  f"{decision.reason}")
    return model


def fusion_decisions(model, example_inputs=None):
    """What fuse(model, example_inputs) would decide for each nn.Linear, as FusionDecisions,
    without changing model (it warns as fuse() would where model cannot be traced). Where
    forward can be traced only with its inputs' shapes and none are given, a call's layers
    are reported as decided at the first call."""
    decisions = []
    _fuse_model(model, example_inputs, decisions, apply=False)
    return sorted(set(decisions))
