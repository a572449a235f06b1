/* The machine's FMA limit: independent fused multiply-adds on registers, nothing from memory.
 * Built and run by benchmarks/machine.py (cc -O3 -march=native -fopenmp); prints GFLOP/s of
 * float32 for the thread count OMP_NUM_THREADS. The vectors are 64 bytes, which the compiler
 * maps onto the widest FMA the CPU has (one zmm, two ymm or four xmm registers). */
#include <omp.h>
#include <stdio.h>

typedef float vec __attribute__((vector_size(64)));
enum { kChains = 16, kIterations = 20000000 };

int main(void) {
  double best = 0;
  for (int repeat = 0; repeat < 5; ++repeat) {
    float sink = 0;
    const double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    {
      vec acc[kChains], b, c;
      for (int k = 0; k < 16; ++k) b[k] = 0.999999f, c[k] = 1e-7f;
      for (int i = 0; i < kChains; ++i) acc[i] = b * (float)(i + 1);
      for (long n = 0; n < kIterations / kChains; ++n) {
#pragma GCC unroll 16
        for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;
      }
      for (int i = 0; i < kChains; ++i) sink += acc[i][0];
    }
    const double seconds = omp_get_wtime() - start;
    const double flops = 2.0 * 16 * kChains * (double)(kIterations / kChains) * omp_get_max_threads();
    if (flops / seconds > best) best = flops / seconds;
    if (sink == 1234.5f) printf("-");
  }
  printf("%.1f\n", best / 1e9);
  return 0;
}
