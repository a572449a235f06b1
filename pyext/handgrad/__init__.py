"""handgrad: fused Linear+activation layers with hand-written C++ forward and backward kernels.

Importing the package loads the operator library (torch.ops.handgrad.*) and registers the
fake kernels that torch.compile and torch.export use, and the ops' DTensor sharding rules.
The public API is in handgrad.functional, handgrad.nn and handgrad.autograd.
"""

import torch

from . import _build_config


def _check_cpu_capability():
    # The CPU kernels are compiled for one SIMD level; loading them on a CPU without it
    # would crash on the first illegal instruction, so refuse here with a way out.
    levels = ["DEFAULT", "AVX2", "AVX512"]
    built = _build_config.CPU_CAPABILITY
    here = torch.backends.cpu.get_cpu_capability()
    if built != "DEFAULT" and (here not in levels or levels.index(here) < levels.index(built)):
        raise ImportError(
            f"handgrad was built for {built} CPUs but this CPU (or ATEN_CPU_CAPABILITY) "
            f"offers {here}; rebuild it here with "
            "`HANDGRAD_CPU_CAPABILITY=DEFAULT pip install --no-build-isolation .`"
        )


_check_cpu_capability()

from . import _C  # noqa: E402,F401  (registers the ops)
from . import _fake  # noqa: E402,F401  (registers their fake kernels)
from . import _vmap  # noqa: E402,F401  (and their vmap rules)
from . import _distributed  # noqa: E402,F401  (and their DTensor rules, once DTensor loads)
from . import autograd, functional, memory, nn  # noqa: E402

try:
    from importlib.metadata import version as _version

    __version__ = _version("handgrad")
except Exception:  # running from a source tree that pip did not install
    __version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether this build of handgrad contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("handgrad::linear_activation", "CUDA")


def build_info() -> dict:
    """What this build runs: the SIMD level its CPU kernels were compiled for, the CPU
    micro-kernel, and whether it has the CUDA kernels."""
    capability = _build_config.CPU_CAPABILITY
    return {
        "cpu_capability": capability,
        "cpu_micro_kernel": f"handgrad 6x4 registers on at::vec::Vectorized ({capability})",
        "cuda": cuda_built(),
    }


__all__ = ["autograd", "functional", "memory", "nn", "build_info", "cuda_built", "__version__"]
