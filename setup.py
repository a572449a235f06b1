"""Builds handgrad._C: a CppExtension, or a CUDAExtension when CUDA is there.

Switches (environment variables):
  HANDGRAD_CUDA=0|1         force the CPU-only or the CUDA build (default: CUDA when torch
                            has CUDA and a toolkit is found)
  TORCH_CUDA_ARCH_LIST      GPU architectures of the CUDA build (default "8.0;9.0+PTX":
                            A100, and H100/H200 with PTX for newer GPUs)
  HANDGRAD_CPU_CAPABILITY   DEFAULT, AVX2 or AVX512: the SIMD level of the CPU kernels
                            (default: what this machine supports, as PyTorch detects it)
  HANDGRAD_SANITIZE=1       AddressSanitizer and UndefinedBehaviorSanitizer (`make sanitize`)
  DEBUG=1                   -O0 -g
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup


def find_cuda_home():
    """Point CUDA_HOME at the toolkit root, unless it is set.

    PyTorch guesses the root as the folder above `which nvcc`, which is wrong where nvcc is
    a wrapper script outside the toolkit (such as /usr/local/bin/nvcc); nvcc knows its own
    root. Must run before torch.utils.cpp_extension is imported.
    """
    nvcc = shutil.which("nvcc")
    if os.getenv("CUDA_HOME") or nvcc is None:
        return
    dry_run = subprocess.run([nvcc, "-dryrun", "-x", "cu", os.devnull], capture_output=True, text=True)
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.normpath(line.split("=", 1)[1])
            return


find_cuda_home()
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    # pip's isolated build environments live in pip-build-env-* folders on sys.path.
    if any("pip-build-env" in path for path in sys.path):
        sys.exit(
            "handgrad: this build cannot see torch because pip is building in an isolated "
            "environment. Build against the torch you have installed:\n"
            "  pip install --no-build-isolation .\n"
            "(handgrad does not let pip fetch torch for the build: that would download a "
            "multi-GB CUDA build just to compile against it.)"
        )
    sys.exit(
        "handgrad: PyTorch must be installed before handgrad is built, and the build must "
        "see it.\n  pip install torch numpy            (or the torch you use)\n"
        "  pip install --no-build-isolation .\n"
        "Build isolation is off on purpose: an isolated build would download a multi-GB "
        "CUDA build of torch just to compile against it."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.getenv("DEBUG", "0") == "1"
SANITIZE = os.getenv("HANDGRAD_SANITIZE", "0") == "1"
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer", "-g"]

# Compiler flags and macros for each SIMD level of at::vec::Vectorized, as ATen uses them.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_capability():
    chosen = os.getenv("HANDGRAD_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    chosen = chosen.upper()
    return chosen if chosen in CPU_CAPABILITY_FLAGS else "DEFAULT"


def use_cuda():
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    forced = os.getenv("HANDGRAD_CUDA")
    if forced is None:
        return available
    if forced == "1" and not available:
        sys.exit(
            f"handgrad: HANDGRAD_CUDA=1, but torch {torch.__version__} is not a CUDA build"
            if torch.version.cuda is None
            else "handgrad: HANDGRAD_CUDA=1, but no CUDA toolkit was found: set CUDA_HOME"
        )
    return forced == "1"


def cublas_include_dirs():
    """Where cublas_v2.h is, if not in the toolkit: torch's NVIDIA wheels carry it."""
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    headers = [h for root in nvidia.__path__ for h in glob.glob(os.path.join(root, "*", "include", "cublas_v2.h"))]
    return sorted({os.path.dirname(h) for h in headers})


def write_build_config(capability):
    # Read at import time, before the library is loaded: a library built for AVX-512
    # must not be loaded on a CPU without it.
    with open(os.path.join(ROOT, "pyext", "handgrad", "_build_config.py"), "w") as f:
        f.write(
            f"# Written by setup.py at build time.\nCPU_CAPABILITY = {capability!r}\n"
        )


def get_extensions():
    capability = cpu_capability()
    cuda = use_cuda()
    write_build_config(capability)

    cxx_flags = [
        "-O0" if DEBUG else "-O3",
        "-fopenmp",
        # at::vec's partial loads leave unused lanes unset by design; GCC warns about it
        # hundreds of times inside its own AVX-512 headers.
        "-Wno-maybe-uninitialized",
        f"-DCPU_CAPABILITY={capability}",
        f"-DCPU_CAPABILITY_{capability}",
        *CPU_CAPABILITY_FLAGS[capability],
    ]
    if DEBUG:
        cxx_flags += ["-g"]
    link_flags = ["-fopenmp"]
    if SANITIZE:
        cxx_flags += SANITIZER_FLAGS
        link_flags += SANITIZER_FLAGS
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra_compile_args = {"cxx": cxx_flags}
    extension, include_dirs = cpp_extension.CppExtension, []
    if cuda:
        extension = cpp_extension.CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra_compile_args["nvcc"] = ["-O0" if DEBUG else "-O3", "-g" if DEBUG else "-lineinfo"]
        include_dirs = cublas_include_dirs()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return [
        extension(
            "handgrad._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=link_flags,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
