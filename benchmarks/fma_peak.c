/* The machine's FMA limit for one CPU capability: independent fused multiply-adds on
 * registers, nothing from memory. Built and run by benchmarks/machine.py once per capability,
 * with that capability's flags and the vector width and number of chains that fit its
 * register file (a chain that spills measures the spill, not the FMA units):
 *   AVX512  -mavx512f -mfma   64-byte vectors, 16 chains (+2 registers) of 32 zmm
 *   AVX2    -mavx2 -mfma      32-byte vectors, 12 chains (+2) of 16 ymm
 *   DEFAULT (SSE2)            16-byte vectors, 12 chains (+2) of 16 xmm, multiply then add
 * Prints GFLOP/s of float32 for the thread count OMP_NUM_THREADS. */
#include <omp.h>
#include <stdio.h>

#ifndef VECTOR_BYTES
#define VECTOR_BYTES 16
#endif
#ifndef CHAINS
#define CHAINS 12
#endif

enum { kLanes = VECTOR_BYTES / 4, kChains = CHAINS, kIterations = 20000000 };
typedef float vec __attribute__((vector_size(VECTOR_BYTES)));

int main(void) {
  double best = 0;
  for (int repeat = 0; repeat < 5; ++repeat) {
    float sink = 0;
    const double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    {
      vec acc[kChains], b, c;
      for (int k = 0; k < kLanes; ++k) b[k] = 0.999999f, c[k] = 1e-7f;
      for (int i = 0; i < kChains; ++i) acc[i] = b * (float)(i + 1);
      for (long n = 0; n < kIterations / kChains; ++n) {
#pragma GCC unroll 24
        for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;
      }
      for (int i = 0; i < kChains; ++i) sink += acc[i][0];
    }
    const double seconds = omp_get_wtime() - start;
    const double flops = 2.0 * kLanes * kChains * (double)(kIterations / kChains) * omp_get_max_threads();
    if (flops / seconds > best) best = flops / seconds;
    if (sink == 1234.5f) printf("-");
  }
  printf("%.1f\n", best / 1e9);
  return 0;
}
