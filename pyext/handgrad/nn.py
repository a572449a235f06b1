"""Drop-in modules: fused Linear+activation layers, standalone activations, and MLP (defined in _modules.py;
fuse() is in _fuse.py, both exported here and fuse() at the top level too).

The fused layers are nn.Linear subclasses: the same constructor, parameters (`weight`,
`bias`), initialisation, state_dict and repr, with the activation applied in the same
kernel as the bias.
"""


from ._modules import (  # noqa: F401
    LinearReLU,
    LinearLeakyReLU,
    LinearSigmoid,
    LinearTanh,
    ReLU,
    LeakyReLU,
    Sigmoid,
    Tanh,
    LinearSiLU,
    LinearGELU,
    SiLU,
    GELU,
    LinearSoftplus,
    Softplus,
    MLP,
)
from ._fuse import FusionDecision, fuse, fusion_decisions

__all__ = [
    "LinearReLU",
    "LinearLeakyReLU",
    "LinearSigmoid",
    "LinearTanh",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "LinearSiLU",
    "LinearGELU",
    "SiLU",
    "GELU",
    "LinearSoftplus",
    "Softplus",
    "MLP",
    "fuse",
    "fusion_decisions",
    "FusionDecision",
]
