"""What bounds a figure on this machine: the CPU, its FMA limit and BLAS's speed, measured.

Every benchmark table starts with machine_description(), so that a reader can tell how close
each figure is to what the machine can do:
  - the FMA limit of each CPU capability this machine offers: benchmarks/fma_peak.c,
    independent float32 FMAs on registers, built here with the system compiler for that
    capability (its flags, vector width and chains), run on 1 thread and on all of torch's;
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


# Per capability: compiler flags, vector bytes and chains that fit the register file.
FMA_PROBES = {
    "DEFAULT": ([], 16, 12),
    "AVX2": (["-mavx2", "-mfma"], 32, 12),
    "AVX512": (["-mavx512f", "-mfma"], 64, 16),
}


def running_capability():
    """The CPU capability whose kernels handgrad runs now."""
    return handgrad.build_info()["cpu_capability"]


def fma_limit(threads, capability=None):
    """GFLOP/s of float32 FMAs on `threads` threads with the vectors of `capability` (default:
    the one handgrad runs), or None where no C compiler is found. Measured once per process
    and capability: the table's header measures it before any timing, and every later use
    (a table's "% of limit" and bound columns) reads that figure. Measured again after the
    timings (a separate cache entry, as it was), one AVX512 run read 116 GFLOP/s on 2 threads
    where its header had read 235, and printed the engine at 159 % of the limit."""
    return _measured_fma_limit(threads, capability or running_capability())


@functools.lru_cache(maxsize=None)
def _measured_fma_limit(threads, capability):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or capability not in FMA_PROBES:
        return None
    flags, vector_bytes, chains = FMA_PROBES[capability]
    with tempfile.TemporaryDirectory() as folder:
        program = os.path.join(folder, "fma_peak")
        built = subprocess.run([compiler, "-O3", *flags, "-ffp-contract=fast", "-fopenmp",
                                f"-DVECTOR_BYTES={vector_bytes}", f"-DCHAINS={chains}",
                                os.path.join(HERE, "fma_peak.c"), "-o", program], capture_output=True)
        if built.returncode != 0:
            return None
        # The best of three processes (each the best of five runs): on a shared VM a
        # neighbour took one vCPU for a whole process once, and the 2-thread figure read as
        # the 1-thread one (117 against 228-234), which put the engine at 128 % of it.
        readings = []
        for _ in range(3):
            result = subprocess.run([program], capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if result.returncode != 0:
                return None
            readings.append(float(result.stdout.strip()))
        return max(readings)


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
    """One paragraph: the machine, and its measured limits on the CPU, per capability."""
    if device == "cuda":
        return (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; Python "
                f"{platform.python_version()}, torch {torch.__version__}, handgrad {handgrad.__version__}")
    threads = torch.get_num_threads()
    limits = []
    for capability in handgrad._capability.runnable():
        one, all_threads = fma_limit(1, capability), fma_limit(threads, capability)
        limits.append(f"{capability} {one:.0f} on 1 thread, {all_threads:.0f} on {threads}"
                      if one is not None else f"{capability} not measured (no C compiler)")
    return (f"{cpu_model()}, {os.cpu_count()} cores, {threads} torch threads; CPU capability offered "
            f"{handgrad._capability.offered()}, handgrad runs **{running_capability()}** "
            f"({handgrad.build_info()['cpu_micro_kernel']}); FMA limit GFLOP/s: {'; '.join(limits)}; "
            f"BLAS sgemm (torch.mm 1024^3) {blas_gflops():.0f} GFLOP/s on {threads} threads; Python "
            f"{platform.python_version()}, torch {torch.__version__}, handgrad {handgrad.__version__}")
