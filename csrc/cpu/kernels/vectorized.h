// The primitives that csrc/activation.h needs, for at::vec::Vectorized, so that the
// CPU kernels run the very same formulas on whole SIMD registers.
//
// They live in Vectorized's own namespace, where argument-dependent lookup finds them from
// the formulas whatever the order of includes.
#pragma once

#include <ATen/OpMathType.h>
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

// activation.h's exp_of_nonpositive, lane for lane the same operations and so the same bits
// (NaN aside: here it stays NaN through the polynomial; GELU's f carries it either way). The
// clamp and the zero below -87 take one instruction each: this runs once per GELU.
inline Vectorized<float> exp_of_nonpositive(const Vectorized<float>& y) {
  using F = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const F x = clamp_min(y, F(-87.f));
  const F n = fmadd(x, F(handgrad::kLog2E), F(handgrad::kExpShifter)) - F(handgrad::kExpShifter);
  const F r = fmadd(-n, F(handgrad::kLn2Low), fmadd(-n, F(handgrad::kLn2High), x));
  F p(handgrad::kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = fmadd(p, r, F(handgrad::kExpTaylor[i]));
  const F scale = cast<float>((convert_to_int_of_same_size(n) + I(127)) << I(23));  // 2^n
  return where(y < F(-87.f), F(0.f), p * scale);
}

inline Vectorized<float> magnitude(const Vectorized<float>& x) {
  return x.abs();
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

// Float32 lanes take handgrad's own e^y and Phi, as float32 scalars do (activation.h).
template <>
struct handgrad::is_float32_on_cpu<at::vec::Vectorized<float>> : std::true_type {};

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

// The registers the elementwise formulas run on. On x86-64's DEFAULT capability at::vec's
// Vectorized is the portable array, whose comparisons and blends go lane by lane through
// memset and branches that GCC leaves scalar: ReLU over 1024 x 256 took 811 us there against
// eager's 121. There the formulas run on plain scalars instead, in loops the compiler
// vectorizes with SSE2 itself: lane for lane the same operations, and so the same bits.
// (aarch64's DEFAULT has NEON's Vectorized.)
#if defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
constexpr bool kScalarLanes = true;
template <typename T>
using Lanes = T;
#else
constexpr bool kScalarLanes = false;
template <typename T>
using Lanes = at::vec::Vectorized<T>;
#endif

// out[i] = op(in[i]) for i < n, op over Lanes of the accumulation type: at::vec::map's
// contract (bfloat16 and float16 widened to float, rounded back), on either kind of lanes.
template <typename Op, typename T>
void map_lanes(const Op& op, T* out, const T* in, int64_t n) {
  if constexpr (kScalarLanes) {
    using Math = at::opmath_type<T>;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(op(static_cast<Math>(in[i])));
  } else {
    at::vec::map(op, out, in, n);
  }
}

template <typename Op, typename T>
void map2_lanes(const Op& op, T* out, const T* a, const T* b, int64_t n) {
  if constexpr (kScalarLanes) {
    using Math = at::opmath_type<T>;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>(op(static_cast<Math>(a[i]), static_cast<Math>(b[i])));
    }
  } else {
    at::vec::map2(op, out, a, b, n);
  }
}

template <typename Op, typename T>
void map3_lanes(const Op& op, T* out, const T* a, const T* b, const T* c, int64_t n) {
  if constexpr (kScalarLanes) {
    using Math = at::opmath_type<T>;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>(op(static_cast<Math>(a[i]), static_cast<Math>(b[i]), static_cast<Math>(c[i])));
    }
  } else {
    at::vec::map3(op, out, a, b, c, n);
  }
}

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
  const ActivationConstants<Lanes<T>> k(params);
  map_lanes([&](Lanes<T> f) { return activate<A>(f, k); }, out, in, n);
}

// A bias gradient's column sums over a block of rows, so that the error grows with runs of
// rows rather than with rows: runs of kRunRows rows are summed one after another, and each
// run is added to sums as it ends. Called for each row in order, i counting from the block's
// first row.
constexpr int64_t kRunRows = 8;

template <typename T>
void add_row_to_sums(int64_t i, bool last_row, const T* row, T* run, T* sums, int64_t cols) {
  const auto add = [](Lanes<T> a, Lanes<T> b) { return a + b; };
  if (i % kRunRows == 0) {
    std::copy_n(row, cols, run);
  } else {
    map2_lanes(add, run, run, row, cols);
  }
  if (i % kRunRows == kRunRows - 1 || last_row) map2_lanes(add, sums, sums, run, cols);
}

// parts[0 .. n) = the sum of `count` parts, `stride` apart, added pairwise in a fixed tree:
// accurate, and the same bits however the parts were shared among threads.
template <typename T>
void add_pairwise(T* parts, int64_t count, int64_t stride, int64_t n) {
  const auto add = [](Lanes<T> a, Lanes<T> b) { return a + b; };
  for (int64_t step = 1; step < count; step *= 2) {
    for (int64_t p = 0; p + step < count; p += 2 * step) {
      map2_lanes(add, parts + p * stride, parts + p * stride, parts + (p + step) * stride, n);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
