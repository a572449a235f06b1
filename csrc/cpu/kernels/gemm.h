// handgrad's own matrix-product micro-kernel for the CPU, on at::vec::Vectorized (SSE2
// registers of GCC's vector extension on x86-64's DEFAULT path).
//
//   C (rows x cols) = init + A (rows x depth) B (depth x cols)
//
// A is read one element at a time, broadcast into a register, so any strides serve (the
// same kernel computes h Omega^T, g Omega and g^T h); B and C are row-major with a leading
// dimension. A tile of kTileRows rows by up to kTileVectors registers of columns stays in
// registers for the whole depth, one FMA per element of A and vector of B. Every element
// of C is one chain of FMAs over the depth in order, whatever tile or tail computes it, so
// the result does not depend on where an element lies or how the work was split: the same
// bits on every run and for every thread count.
//
// Loads and stores at the right edge are masked (Vectorized::loadu/store with a count), so
// no argument needs padding.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
// One SSE2 register, by GCC's vector extension, with the part of Vectorized's interface the
// tile uses. at::vec's portable Vectorized keeps a tile's accumulators in memory: its tile ran
// at 5.7 GFLOP/s, 10 % of the DEFAULT limit (bench_microkernels.py). a * b + c is two
// roundings, as Vectorized's DEFAULT fmadd: no FMA instruction on this path.
template <typename T>
struct Sse2Raw;
template <>
struct Sse2Raw<float> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Sse2Raw<double> {
  typedef double type __attribute__((vector_size(16)));
};

template <typename T>
struct Sse2Register {
  using Raw = typename Sse2Raw<T>::type;
  Raw v;

  static constexpr int64_t size() { return 16 / sizeof(T); }
  Sse2Register() = default;
  Sse2Register(Raw raw) : v(raw) {}
  explicit Sse2Register(T x) {  // lane by lane: Raw{} + x would be an addition (0 + -0 is +0)
    for (int64_t i = 0; i < size(); ++i) v[i] = x;
  }
  static Sse2Register loadu(const T* p, int64_t count = size()) {
    Raw raw{};
    std::memcpy(&raw, p, count * sizeof(T));
    return raw;
  }
  void store(T* p, int64_t count = size()) const { std::memcpy(p, &v, count * sizeof(T)); }
  friend Sse2Register operator+(Sse2Register a, Sse2Register b) { return a.v + b.v; }
  friend Sse2Register fmadd(Sse2Register a, Sse2Register b, Sse2Register c) { return a.v * b.v + c.v; }
};
template <typename T>
using Vec = Sse2Register<T>;
#else
template <typename T>
using Vec = at::vec::Vectorized<T>;
using at::vec::fmadd;
#endif

// The tile is sized for the register file of the capability it is compiled for: the
// accumulators, one register of A and kTileVectors of B must fit, or every FMA waits on a
// spill.
#if defined(CPU_CAPABILITY_AVX512)
// 6 rows by 4 zmm: 24 accumulators + 4 + 1 of AVX-512's 32 registers.
constexpr int kTileRows = 6, kTileVectors = 4;
constexpr const char* kMicroKernel = "6 rows x 4 zmm registers (AVX512: 29 of 32 registers)";
constexpr bool kUseBrgemm = true;
#elif defined(CPU_CAPABILITY_AVX2)
// 6 rows by 2 ymm: 12 accumulators + 2 + 1 of AVX2's 16 registers.
constexpr int kTileRows = 6, kTileVectors = 2;
constexpr const char* kMicroKernel = "6 rows x 2 ymm registers (AVX2: 15 of 16 registers)";
constexpr bool kUseBrgemm = true;
#elif defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
// 6 rows by 2 xmm: 12 accumulators + 2 + 1 of SSE2's 16 registers.
constexpr int kTileRows = 6, kTileVectors = 2;
constexpr const char* kMicroKernel = "6 rows x 2 xmm registers (DEFAULT: 15 of 16 registers)";
constexpr bool kUseBrgemm = false;  // the portable path
#else
// at::vec's vectors on other CPUs (NEON's 8 floats on aarch64): 4 rows by one vector.
constexpr int kTileRows = 4, kTileVectors = 1;
constexpr const char* kMicroKernel = "4 rows x 1 at::vec::Vectorized (DEFAULT)";
constexpr bool kUseBrgemm = false;  // the portable path
#endif

// What the product is added to: nothing, C's own values (accumulate), or a row of bias
// values (F.linear's addmm: the bias inside the accumulation, rounded once). Either is added
// to the finished product, as BLAS adds C, not summed with its terms: a large bias would
// round every small term it met.
enum class Init : int8_t { Zero, AddToC, BiasRow };

// The depth is summed in pieces of this many terms, each added to C: an error that grows
// with the pieces' length plus their number, not with the depth (as BLAS's blocking of K).
constexpr int64_t kDepthPiece = 128;

template <typename T, int Rows, int Vectors, bool PartialLast>
void tile(int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
          T* c, int64_t ldc, int64_t last_count, Init init, const T* bias) {
  constexpr int64_t L = Vec<T>::size();
  const auto count = [&](int v) { return PartialLast && v == Vectors - 1 ? last_count : L; };
  Vec<T> acc[Rows][Vectors];
  for (int i = 0; i < Rows; ++i) {
    for (int v = 0; v < Vectors; ++v) acc[i][v] = Vec<T>(0);
  }
  for (int64_t p = 0; p < depth; ++p) {
    const T* b_row = b + p * ldb;
    Vec<T> bv[Vectors];
    for (int v = 0; v < Vectors; ++v) {
      bv[v] = PartialLast && v == Vectors - 1 ? Vec<T>::loadu(b_row + v * L, last_count)
                                              : Vec<T>::loadu(b_row + v * L);
    }
    for (int i = 0; i < Rows; ++i) {
      const Vec<T> av(a[i * a_row + p * a_col]);
      for (int v = 0; v < Vectors; ++v) acc[i][v] = fmadd(av, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < Rows; ++i) {
    for (int v = 0; v < Vectors; ++v) {
      T* out = c + i * ldc + v * L;
      if (init == Init::AddToC) acc[i][v] = acc[i][v] + Vec<T>::loadu(out, count(v));
      if (init == Init::BiasRow) acc[i][v] = acc[i][v] + Vec<T>::loadu(bias + v * L, count(v));
      acc[i][v].store(out, count(v));
    }
  }
}

template <typename T>
using TileFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t,
                        int64_t, Init, const T*);

// The tiles for kTileRows, 4, 2 or 1 rows (a tail of rows takes at most two of them) by 1
// to kTileVectors registers, with the last register full or partial.
constexpr std::array<int, 4> kRowTiles{kTileRows, 4, 2, 1};

template <typename T>
struct Tiles {
  TileFn<T> fn[4][kTileVectors][2]{};

  constexpr Tiles() { set_rows(std::make_integer_sequence<int, 4>{}); }
  template <int... R>
  constexpr void set_rows(std::integer_sequence<int, R...>) {
    (set_vectors<R>(std::make_integer_sequence<int, kTileVectors>{}), ...);
  }
  template <int R, int... V>
  constexpr void set_vectors(std::integer_sequence<int, V...>) {
    ((fn[R][V][0] = &tile<T, kRowTiles[R], V + 1, false>,
      fn[R][V][1] = &tile<T, kRowTiles[R], V + 1, true>), ...);
  }
};

// dst (cols x rows) = src (rows x cols)^T. at::vec's transpose of any shape is scalar code
// on AVX2 (AVX512's goes in 16 x 16 blocks); its 8 x 8 blocks of floats are not. In the
// MNIST-sized backward on 1 thread (AVX2, Zen 3), brgemm's transposes of g took 4.2 % of the
// time as scalar code, 0.9 % in blocks.
template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) {
      int64_t j = 0;
      for (; j + 8 <= cols; j += 8) {
        at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      }
      at::vec::transpose_mxn<float>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst, 8,
                                    static_cast<int>(cols - j));
    }
    at::vec::transpose_mxn<float>(src + i * ld_src, ld_src, dst + i, ld_dst, static_cast<int>(rows - i),
                                  static_cast<int>(cols));
    return;
  }
#endif
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, static_cast<int>(rows), static_cast<int>(cols));
}

// Measured with benchmarks/bench_networks.py: transposing g for brgemm costs a 64-wide
// weight gradient more than it saves; from 256 columns brgemm wins (AVX2 path: 1.35 -> 1.00
// of eager on a 256-wide layer). With transpose's 8 x 8 blocks, 32 columns still lost on
// AVX2 (1 thread: thin64's backward +0-6 %, figure 7.8's +3-15 %).
constexpr int64_t kBrgemmTransposedMinCols = 256;

// C = init + A B by oneDNN's brgemm (at::native::cpublas, JIT-compiled for the CPU it runs
// on), where it measured faster inside the engine (kUseBrgemm; RESULTS.md). A that is
// stored by columns (g^T, for the weight gradient) is transposed first, in cache, which
// pays only where each of its elements serves many columns (kBrgemmTransposedMinCols). The
// bias is added to the finished product, as the tile adds it. Each call runs on one thread
// on a block whose shape follows from the problem's alone: the same bits for every thread
// count.
inline void brgemm_on_this_thread(int64_t rows, int64_t cols, int64_t depth, const float* a,
                                  int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                                  float* c, int64_t ldc, Init init, const float* bias) {
  int64_t lda = a_row;
  if (a_col != 1) {
    thread_local std::vector<float> transposed;
    transposed.resize(rows * depth);
    transpose(a, a_col, transposed.data(), depth, depth, rows);
    a = transposed.data(), lda = depth;
  }
  // In pieces of the depth, as the tiles sum it: one chain over a long depth (700 terms)
  // measured 3x eager's error on the AVX2 path.
  for (int64_t start = 0; start < depth; start += kDepthPiece) {
    at::native::cpublas::brgemm(rows, cols, std::min(kDepthPiece, depth - start), lda, ldb, ldc,
                                start > 0 || init == Init::AddToC, a + start, b + start * ldb, c);
  }
  if (init == Init::BiasRow) {
    for (int64_t i = 0; i < rows; ++i) {
      at::vec::map2([](at::vec::Vectorized<float> x, at::vec::Vectorized<float> y) { return x + y; },
                    c + i * ldc, c + i * ldc, bias, cols);
    }
  }
}

// C = init + A B on one thread by handgrad's tiles, a panel of B's columns at a time.
template <typename T>
void tiles_on_this_thread(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t a_row,
                         int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc, Init init,
                         const T* bias) {
  static constexpr Tiles<T> tiles{};
  constexpr int64_t L = Vec<T>::size(), kPanel = kTileVectors * L;
  // A panel of B's columns is reused by every tile of rows while it is in cache.
  for (int64_t col = 0; col < cols; col += kPanel) {
    const int64_t width = std::min(kPanel, cols - col);
    const int64_t vectors = (width + L - 1) / L, last_count = width - (vectors - 1) * L;
    const bool partial = last_count != L;
    const T* bias_panel = bias == nullptr ? nullptr : bias + col;
    int64_t row = 0;
    for (int r = 0; r < 4; ++r) {
      const int64_t tile_rows = kRowTiles[r];
      const TileFn<T> fn = tiles.fn[r][vectors - 1][partial];
      for (; row + tile_rows <= rows; row += tile_rows) {
        for (int64_t start = 0; start < std::max<int64_t>(depth, 1); start += kDepthPiece) {
          fn(std::min(kDepthPiece, depth - start), a + row * a_row + start * a_col, a_row, a_col,
             b + start * ldb + col, ldb, c + row * ldc + col, ldc, last_count,
             start == 0 ? init : Init::AddToC, bias_panel);
        }
      }
    }
  }
}

// Whether brgemm runs C = A B, where it measured faster. The whole product's shape decides,
// never the share of its columns one thread gets, so the thread count changes nothing.
template <typename T>
bool brgemm_runs(int64_t rows, int64_t cols, int64_t depth, int64_t a_row, int64_t a_col) {
  return kUseBrgemm && std::is_same_v<T, float> && rows > 0 && cols > 0 && depth > 0 &&
         (a_col == 1 || (a_row == 1 && cols >= kBrgemmTransposedMinCols));
}

// C = init + A B on one thread: brgemm (where brgemm_runs), else handgrad's tiles.
template <typename T>
void gemm_on_this_thread(bool brgemm, int64_t rows, int64_t cols, int64_t depth, const T* a,
                         int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc,
                         Init init, const T* bias) {
  if constexpr (kUseBrgemm && std::is_same_v<T, float>) {  // no brgemm call compiled elsewhere
    if (brgemm) {
      brgemm_on_this_thread(rows, cols, depth, a, a_row, a_col, b, ldb, c, ldc, init, bias);
      return;
    }
  }
  tiles_on_this_thread<T>(rows, cols, depth, a, a_row, a_col, b, ldb, c, ldc, init, bias);
}

// A product of at least this many multiply-adds, called outside a parallel region, shares
// its panels of columns among threads (each element is computed as it would be alone).
constexpr int64_t kShareProduct = int64_t{1} << 20;

// C = init + A B, as described at the top. bias (init == BiasRow) has cols elements.
template <typename T>
void gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
          const T* b, int64_t ldb, T* c, int64_t ldc, Init init, const T* bias = nullptr) {
  const bool brgemm = brgemm_runs<T>(rows, cols, depth, a_row, a_col);
  // The tiles' panels, or single vectors for brgemm, which takes any width: 784 columns in
  // panels of 64 gave one thread of two 448 of them, the other 336.
  const int64_t panel = brgemm ? Vec<T>::size() : kTileVectors * Vec<T>::size();
  const int64_t panels = (cols + panel - 1) / panel;
  if (panels > 1 && rows * cols * depth >= kShareProduct && at::get_num_threads() > 1 &&
      !at::in_parallel_region()) {
    at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
      const int64_t col = first * panel, width = std::min(cols, last * panel) - col;
      gemm_on_this_thread<T>(brgemm, rows, width, depth, a, a_row, a_col, b + col, ldb, c + col,
                             ldc, init, bias == nullptr ? nullptr : bias + col);
    });
    return;
  }
  gemm_on_this_thread<T>(brgemm, rows, cols, depth, a, a_row, a_col, b, ldb, c, ldc, init, bias);
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
