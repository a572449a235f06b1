"""Which CPU kernels run: one library of csrc/cpu/kernels/ per capability was built
(csrc/cpu/kernels.h); at import the best one that this CPU offers is loaded.

    torch.backends.cpu.get_cpu_capability()   what the CPU offers (honours ATEN_CPU_CAPABILITY)
    HANDGRAD_CPU_CAPABILITY=DEFAULT|AVX2|AVX512   lowers the choice, to test any path anywhere
"""

import glob
import importlib.machinery
import os
import warnings

import torch

from . import _C, _build_config

# From the least to the most a CPU must offer; a CPU that offers one offers those before it.
LEVELS = ("DEFAULT", "AVX2", "AVX512")
ENVIRONMENT_VARIABLE = "HANDGRAD_CPU_CAPABILITY"


def offered():
    """The highest level this CPU offers, as PyTorch's own kernels see it."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return capability if capability in LEVELS else "DEFAULT"  # e.g. NEON, SVE256, VSX


def choose(requested=None):
    """The capability to run: the highest built one that the CPU offers, at most `requested`
    (default: $HANDGRAD_CPU_CAPABILITY)."""
    if requested is None:
        requested = os.environ.get(ENVIRONMENT_VARIABLE) or None
    can_run = runnable()
    if requested is None:
        return can_run[-1]
    requested = requested.strip().upper()
    if requested not in LEVELS:
        raise ValueError(f"handgrad: {ENVIRONMENT_VARIABLE}={requested!r} is not a CPU capability; "
                         f"expected one of {', '.join(LEVELS)}")
    if requested not in can_run:
        lower = [c for c in can_run if LEVELS.index(c) < LEVELS.index(requested)]
        warnings.warn(f"handgrad: {ENVIRONMENT_VARIABLE}={requested} cannot run here (this CPU offers "
                      f"{offered()}, this build has {', '.join(_build_config.CPU_CAPABILITIES)}); "
                      f"running {lower[-1]}", RuntimeWarning, stacklevel=3)
        return lower[-1]
    return requested


def library_path(capability):
    """The file of the capability's library, beside handgrad._C."""
    folder = os.path.dirname(_C.__file__)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, f"_cpu_{capability}{suffix}")
        if os.path.exists(path):
            return path
    found = ", ".join(sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "_cpu_*"))))
    raise ImportError(f"handgrad: the {capability} CPU kernels are not in {folder} (found: "
                      f"{found or 'none'}); rebuild handgrad with `make install`")


def load(capability):
    """Runs the CPU kernels of `capability` from now on (tests use it to try each path)."""
    if capability not in _build_config.CPU_CAPABILITIES:
        raise ValueError(f"handgrad: this build has no {capability} CPU kernels; it has "
                         f"{', '.join(_build_config.CPU_CAPABILITIES)}")
    if LEVELS.index(capability) > LEVELS.index(offered()):
        raise RuntimeError(f"handgrad: this CPU offers {offered()}, so the {capability} kernels cannot run")
    return _C.load_cpu_kernels(library_path(capability))


def running():
    """(capability, micro-kernel) of the CPU kernels that run."""
    return tuple(_C.cpu_kernels())


def runnable():
    """The built capabilities this CPU can run, lowest first."""
    return [c for c in _build_config.CPU_CAPABILITIES if LEVELS.index(c) <= LEVELS.index(offered())]
