"""The matrix-product micro-kernel, chosen by measurement: handgrad's tiles (csrc/cpu/kernels/gemm.h)
against oneDNN's through ATen (at::native::cpublas::brgemm, the kernel Inductor's CPU GEMM
template uses) and BLAS (at::mm_out, MKL or OpenBLAS as torch was built), on one thread, on
the block shapes the fused engine multiplies: C (m x n) = A (m x k) B (k x n), float32.

It compiles a small extension with torch.utils.cpp_extension (about a minute) and prints a
markdown table of GFLOP/s and each kernel's share of the machine's FMA limit on one thread.

    python benchmarks/bench_microkernels.py [--repeats 2000]
"""

import argparse
import os
import sys

import torch

import handgrad
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/mm.h>
#include <torch/extension.h>
#include <chrono>
#include "cpu/kernels/gemm.h"

// Seconds per call of kernel(m, n, k) on float32 buffers, the best of 5 runs of `repeats`.
double seconds(const std::string& kernel, int64_t m, int64_t n, int64_t k, int64_t repeats) {
  at::Tensor a = at::randn({m, k}), b = at::randn({k, n}), c = at::zeros({m, n});
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  const auto call = [&] {
    if (kernel == "handgrad") {
      handgrad::cpu::tiles_on_this_thread<float>(m, n, k, pa, k, 1, pb, n, pc, n, handgrad::cpu::Init::Zero, nullptr);
    } else if (kernel == "brgemm") {
      at::native::cpublas::brgemm(m, n, k, k, n, n, false, pa, pb, pc);
    } else {
      at::mm_out(c, a, b);
    }
  };
  at::set_num_threads(1);
  call();
  double best = 1e30;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < repeats; ++i) call();
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / repeats);
  }
  if (kernel == "brgemm") at::native::cpublas::brgemm_release(false);
  return best;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("seconds", &seconds); }
"""

SHAPES = [  # (m, n, k): a block of rows times a layer's weight
    (10, 40, 10), (10, 40, 40), (64, 64, 64), (256, 64, 64), (256, 128, 128),
    (32, 256, 784), (64, 256, 256), (48, 1024, 1024),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    from machine import fma_limit, machine_description, running_capability

    # handgrad's tiles as the build compiled them for the capability handgrad runs
    # (HANDGRAD_CPU_CAPABILITY lowers it).
    capability = running_capability()
    module = cpp_extension.load_inline(
        f"handgrad_microkernels_{capability}", cpp_sources=SOURCE, extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O3", *handgrad._build_config.CPU_CAPABILITY_FLAGS[capability]],
        verbose=False)
    limit = fma_limit(1)
    print(f"# Micro-kernels, one thread\n\n{machine_description('cpu')}\n")
    print("| m, n, k | handgrad GFLOP/s | brgemm GFLOP/s | BLAS GFLOP/s | handgrad % of limit | brgemm % | BLAS % |")
    print("|---|---|---|---|---|---|---|")
    for m, n, k in SHAPES:
        repeats = max(10, int(args.repeats * 64**3 / (m * n * k)))
        flops = 2 * m * n * k
        rates = {kernel: flops / module.seconds(kernel, m, n, k, repeats) / 1e9
                 for kernel in ("handgrad", "brgemm", "blas")}
        shares = " | ".join(f"{100 * rates[kernel] / limit:.0f} %" if limit else "-"
                            for kernel in ("handgrad", "brgemm", "blas"))
        print(f"| {m}, {n}, {k} | {rates['handgrad']:.1f} | {rates['brgemm']:.1f} | {rates['blas']:.1f} | {shares} |",
              flush=True)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
