// The primitives that csrc/activation.h needs, for at::vec::Vectorized, so that the
// CPU kernels run the very same formulas on whole SIMD registers.
//
// They live in Vectorized's own namespace, where argument-dependent lookup finds them from
// the formulas whatever the order of includes.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../activation.h"
#include "../../dispatch.h"

// Eager's float and double tanh on x86-64 is MKL's VML (ATen/cpu/vml.h: vmsTanh/vmdTanh),
// which differs from Sleef's in the last bit. libtorch_cpu exports both, but torch ships no
// mkl.h, so they are declared here, weak: where torch was built without MKL (aarch64, a
// source build) they stay null, and Vectorized::tanh runs, as eager's fallback does. The
// count is declared 64 bits wide: MKL's LP64 interface reads its low 32 bits, ILP64 all 64.
extern "C" {
__attribute__((weak)) void vmsTanh(long long n, const float* a, float* r, long long mode);
__attribute__((weak)) void vmdTanh(long long n, const double* a, double* r, long long mode);
}

namespace at::vec {
inline namespace CPU_CAPABILITY {

template <typename T>
inline Vectorized<T> where(
    const Vectorized<T>& condition, const Vectorized<T>& if_true, const Vectorized<T>& if_false) {
  return Vectorized<T>::blendv(if_false, if_true, condition);
}

template <typename T>
inline Vectorized<T> exp(const Vectorized<T>& x) {
  return x.exp();
}

template <typename T>
inline Vectorized<T> tanh(const Vectorized<T>& x) {
  return x.tanh();
}

template <typename T>
inline Vectorized<T> erf(const Vectorized<T>& x) {
  return x.erf();
}

template <typename T>
inline Vectorized<T> log1p(const Vectorized<T>& x) {
  return x.log1p();
}

template <typename T>
inline Vectorized<T> less_than(const Vectorized<T>& a, const Vectorized<T>& b) {
  return a.lt(b);  // 1 or 0 in each lane
}

// One rounding where the capability has FMA instructions; DEFAULT's is a * b + c, as the
// compilers build eager's own DEFAULT kernels.
template <typename T>
inline Vectorized<T> multiply_add(const Vectorized<T>& a, const Vectorized<T>& b, const Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}

}  // namespace CPU_CAPABILITY
}  // namespace at::vec

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

// out[0 .. n) = tanh(in[0 .. n)) by eager's own VML call, in its mode (high accuracy,
// denormals kept, errors ignored), in chunks an int counts; false where there is no MKL.
template <typename T>
bool tanh_as_eager(const T* in, T* out, int64_t n) {
  constexpr long long kMode = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
  constexpr int64_t kChunk = int64_t{1} << 30;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const auto vml = [] {
      if constexpr (std::is_same_v<T, float>) return &vmsTanh; else return &vmdTanh;
    }();
    if (vml == nullptr) return false;
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      vml(std::min(kChunk, n - begin), in + begin, out + begin, kMode);
    }
    return true;
  }
  return false;
}

// out[0 .. n) = a[in[0 .. n)] over contiguous float or double memory (out may be in), in SIMD
// registers, by eager's VML where eager's tanh uses it.
template <Activation A, typename T>
void activate_span(const T* in, T* out, int64_t n, const ActivationParameters& params) {
  if constexpr (A == Activation::Tanh) {
    if (tanh_as_eager(in, out, n)) return;
  }
  const ActivationConstants<at::vec::Vectorized<T>> k(params);
  at::vec::map([&](at::vec::Vectorized<T> f) { return activate<A>(f, k); }, out, in, n);
}

// A bias gradient's column sums over a block of rows, so that the error grows with runs of
// rows rather than with rows: runs of kRunRows rows are summed one after another, and each
// run is added to sums as it ends. Called for each row in order, i counting from the block's
// first row.
constexpr int64_t kRunRows = 8;

template <typename T>
void add_row_to_sums(int64_t i, bool last_row, const T* row, T* run, T* sums, int64_t cols) {
  using Vec = at::vec::Vectorized<T>;
  const auto add = [](Vec a, Vec b) { return a + b; };
  if (i % kRunRows == 0) {
    std::copy_n(row, cols, run);
  } else {
    at::vec::map2(add, run, run, row, cols);
  }
  if (i % kRunRows == kRunRows - 1 || last_row) at::vec::map2(add, sums, sums, run, cols);
}

// parts[0 .. n) = the sum of `count` parts, `stride` apart, added pairwise in a fixed tree:
// accurate, and the same bits however the parts were shared among threads.
template <typename T>
void add_pairwise(T* parts, int64_t count, int64_t stride, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const auto add = [](Vec a, Vec b) { return a + b; };
  for (int64_t step = 1; step < count; step *= 2) {
    for (int64_t p = 0; p + step < count; p += 2 * step) {
      at::vec::map2(add, parts + p * stride, parts + p * stride, parts + (p + step) * stride, n);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
