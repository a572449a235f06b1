"""Builds handgrad._C: a CppExtension, or a CUDAExtension when CUDA is there.

Switches (environment variables):
  HANDGRAD_CUDA=0|1         force the CPU-only or the CUDA build (default: CUDA when torch
                            has CUDA and a toolkit is found)
  TORCH_CUDA_ARCH_LIST      GPU architectures of the CUDA build (default "8.0;9.0+PTX":
                            A100, and H100/H200 with PTX for newer GPUs)
  HANDGRAD_BUILD_CAPABILITIES  comma-separated CPU capabilities to compile the CPU kernels
                            for (default: DEFAULT,AVX2,AVX512 on x86-64, DEFAULT elsewhere);
                            the one that runs is chosen at import (HANDGRAD_CPU_CAPABILITY)
  HANDGRAD_OPENMP=0|1       build without or with OpenMP (default: with it where the C++
                            compiler accepts -fopenmp; without, the CPU kernels run on one
                            thread, as Apple's clang gives)
  HANDGRAD_SANITIZE=1       AddressSanitizer and UndefinedBehaviorSanitizer (`make sanitize`)
  DEBUG=1                   -O0 -g
"""

import glob
import os
import platform
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

# Compiler flags for each CPU capability, as ATen's CMake gives its kernels
# (aten/src/ATen/native/cpu/README.md); torch.backends.cpu.get_cpu_capability() names the
# level a CPU offers.
#
# DEFAULT's elementwise formulas are plain scalar loops the compiler vectorizes itself
# (csrc/cpu/kernels/vectorized.h: Lanes). -fno-trapping-math lets GCC compute both sides of a
# select, as LeakyReLU's f > 0 ? f : slope * f, and so vectorize it (9.5 ms -> <1 ms over 4M
# floats); it changes no value, only the assumption that an FP exception may trap.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": ["-fno-trapping-math"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_capabilities():
    """The capabilities the CPU kernels are compiled for: every x86-64 level, else DEFAULT
    (at::vec's NEON on aarch64)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    default = ["DEFAULT", "AVX2", "AVX512"] if x86 else ["DEFAULT"]
    chosen = os.getenv("HANDGRAD_BUILD_CAPABILITIES")
    if not chosen:
        return default
    chosen = [c.strip().upper() for c in chosen.split(",") if c.strip()]
    for capability in chosen:
        if capability not in default:
            sys.exit(f"handgrad: HANDGRAD_BUILD_CAPABILITIES names {capability}, which this "
                     f"{platform.machine()} build cannot compile; choose from {','.join(default)}")
    if "DEFAULT" not in chosen:
        sys.exit("handgrad: HANDGRAD_BUILD_CAPABILITIES must include DEFAULT, the path every CPU can run")
    return [c for c in default if c in chosen]


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


def compiler_accepts_openmp():
    """Whether the C++ compiler compiles and links an OpenMP program with -fopenmp: checked
    once, by doing it."""
    import tempfile

    compiler = os.getenv("CXX", "c++")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "openmp.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([compiler, "-fopenmp", source, "-o", os.path.join(folder, "openmp")],
                                    capture_output=True)
        except OSError:
            return False
        return result.returncode == 0


def use_openmp():
    forced = os.getenv("HANDGRAD_OPENMP")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"handgrad: HANDGRAD_OPENMP must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    accepted = compiler_accepts_openmp()
    if forced == "1" and not accepted:
        sys.exit(f"handgrad: HANDGRAD_OPENMP=1, but the C++ compiler ({os.getenv('CXX', 'c++')}) "
                 "cannot compile and link with -fopenmp; install an OpenMP runtime for it, or "
                 "build with HANDGRAD_OPENMP=0 (the CPU kernels then run on one thread)")
    if not accepted:
        print("handgrad: the C++ compiler rejects -fopenmp: building without OpenMP, so the CPU "
              "kernels will run on one thread (HANDGRAD_OPENMP=1 to insist)", file=sys.stderr)
    return accepted


def torch_vec_flags():
    """The at::vec macros torch's own build defines: on Arm, AT_BUILD_ARM_VEC256_WITH_SLEEF
    makes Vectorized's exp call Sleef (libtorch_cpu exports it) as ATen's kernels do; without
    it every lane calls std::exp, which is slower and not eager's bits."""
    sleef = "-DAT_BUILD_ARM_VEC256_WITH_SLEEF"
    return [sleef] if sleef in torch.__config__.show() else []


TORCH_VEC_FLAGS = torch_vec_flags()  # asked of torch once, for every capability


def capability_flags(capability):
    """The macros and flags that compile csrc/cpu/kernels/ for one capability."""
    return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
            *CPU_CAPABILITY_FLAGS[capability], *TORCH_VEC_FLAGS]


def write_build_config(capabilities, openmp):
    # Read at import, to choose among the capability libraries that were built; the flags
    # serve benchmarks/bench_microkernels.py, which compiles gemm.h as the build does.
    flags = {capability: capability_flags(capability) for capability in capabilities}
    with open(os.path.join(ROOT, "pyext", "handgrad", "_build_config.py"), "w") as f:
        f.write(f"# Written by setup.py at build time.\nCPU_CAPABILITIES = {tuple(capabilities)!r}\n"
                f"CPU_CAPABILITY_FLAGS = {flags!r}\nOPENMP = {openmp!r}\n")


def get_extensions():
    capabilities = cpu_capabilities()
    cuda = use_cuda()
    # Without OpenMP, at::parallel_for compiles to a plain call (ATen/Parallel-inl.h).
    openmp = ["-fopenmp"] if use_openmp() else []
    write_build_config(capabilities, bool(openmp))

    common_flags = [
        "-O0" if DEBUG else "-O3",
        *openmp,
        # at::vec's partial loads leave unused lanes unset by design; GCC warns about it
        # hundreds of times inside its own AVX-512 headers.
        "-Wno-maybe-uninitialized",
    ] + (["-g"] if DEBUG else []) + (SANITIZER_FLAGS if SANITIZE else [])
    link_flags = openmp + (SANITIZER_FLAGS if SANITIZE else [])

    # The ops, autograd and bindings, compiled once for any CPU.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra_compile_args = {"cxx": common_flags}
    extension, include_dirs = cpp_extension.CppExtension, []
    if cuda:
        extension = cpp_extension.CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra_compile_args["nvcc"] = ["-O0" if DEBUG else "-O3", "-g" if DEBUG else "-lineinfo"]
        include_dirs = cublas_include_dirs()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    extensions = [extension("handgrad._C", sources, include_dirs=include_dirs,
                            extra_compile_args=extra_compile_args, extra_link_args=link_flags)]
    # The CPU kernels, once per capability, each a library of its own with hidden symbols
    # (csrc/cpu/kernels.h says why).
    kernel_sources = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
    for capability in capabilities:
        flags = [*capability_flags(capability), "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
        extensions.append(cpp_extension.CppExtension(
            f"handgrad._cpu_{capability}", kernel_sources,
            extra_compile_args={"cxx": common_flags + flags}, extra_link_args=link_flags))
    return extensions


class BuildExtension(cpp_extension.BuildExtension):
    """Builds each library in a folder of its own: the capability libraries compile the same
    sources with different flags, which must not share object files."""

    def build_extension(self, ext):
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
