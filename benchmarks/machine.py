"""What bounds a figure on this machine: the CPU, its FMA limit and BLAS's speed, measured.

Every benchmark table starts with machine_description(), so that a reader can tell how close
each figure is to what the machine can do:
  - the FMA limit: benchmarks/fma_peak.c, independent float32 FMAs on registers, built here
    with the system compiler (cc -O3 -march=native) and run on 1 thread and on all of torch's;
  - BLAS: torch.mm of two 1024x1024 float32 matrices (MKL or OpenBLAS, as torch was built),
    on all of torch's threads.
"""

import functools
import os
import platform
import shutil
import subprocess
import tempfile
import time

import torch

import handgrad

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def fma_limit(threads):
    """GFLOP/s of float32 FMAs on `threads` threads, or None where no C compiler is found."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        program = os.path.join(folder, "fma_peak")
        built = subprocess.run([compiler, "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp",
                                os.path.join(HERE, "fma_peak.c"), "-o", program], capture_output=True)
        if built.returncode != 0:
            return None
        result = subprocess.run([program], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return float(result.stdout.strip()) if result.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def blas_gflops(size=1024):
    """GFLOP/s of torch.mm in float32 on torch's threads: the best of 5 timed runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * size**3 / best / 1e9


def machine_description(device="cpu"):
    """One paragraph: the machine, and its measured limits on the CPU."""
    if device == "cuda":
        return (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; Python "
                f"{platform.python_version()}, torch {torch.__version__}, handgrad {handgrad.__version__}")
    threads = torch.get_num_threads()
    one, all_threads = fma_limit(1), fma_limit(threads)
    limit = ("FMA limit not measured (no C compiler)" if one is None else
             f"FMA limit {one:.0f} GFLOP/s on 1 thread, {all_threads:.0f} on {threads}")
    return (f"{cpu_model()}, {os.cpu_count()} cores, {threads} torch threads, capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {limit}; BLAS sgemm (torch.mm 1024^3) "
            f"{blas_gflops():.0f} GFLOP/s; Python {platform.python_version()}, torch {torch.__version__}, "
            f"handgrad {handgrad.__version__}")
