"""handgrad: fused Linear+activation layers with hand-written C++ forward and backward kernels.

Importing the package loads the operator library (torch.ops.handgrad.*) and registers the
fake kernels that torch.compile and torch.export use, and the ops' DTensor sharding rules.
The public API is in handgrad.functional, handgrad.nn and handgrad.autograd; handgrad.fuse
is handgrad.nn.fuse.
"""

import torch

from . import _C  # noqa: F401  (registers the ops)
from . import _capability

_capability.load(_capability.choose())  # the CPU kernels for this CPU

from . import _fake  # noqa: E402,F401  (registers their fake kernels)
from . import _vmap  # noqa: E402,F401  (and their vmap rules)
from . import _distributed  # noqa: E402,F401  (and their DTensor rules, once DTensor loads)
from . import autograd, functional, memory, nn  # noqa: E402
from .nn import fuse  # noqa: E402  (handgrad.fuse(model), as handgrad.nn.fuse)
from ._decompositions import decompositions  # noqa: E402

try:
    from importlib.metadata import version as _version

    __version__ = _version("handgrad")
except Exception:  # running from a source tree that pip did not install
    __version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether this build of handgrad contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("handgrad::linear_activation", "CUDA")


def build_info() -> dict:
    """What this build has and what runs: the CPU capabilities its kernels were compiled
    for, the one chosen for this CPU (lowered by HANDGRAD_CPU_CAPABILITY) and its
    micro-kernel, whether the CPU kernels were built with OpenMP (without it they run on
    one thread), and whether it has the CUDA kernels."""
    capability, micro_kernel = _capability.running()
    openmp = _capability._build_config.OPENMP
    return {
        "cpu_capabilities_built": list(_capability._build_config.CPU_CAPABILITIES),
        "cpu_capability_offered": _capability.offered(),
        "cpu_capability": capability,
        "cpu_micro_kernel": micro_kernel,
        "openmp": openmp,
        "cpu_kernel_threads": "torch's intra-op threads" if openmp else "one (built without OpenMP)",
        "cuda": cuda_built(),
    }


__all__ = ["autograd", "functional", "memory", "nn", "fuse", "decompositions", "build_info", "cuda_built",
           "__version__"]
