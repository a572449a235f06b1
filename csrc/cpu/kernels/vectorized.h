// The two primitives that csrc/activation.h needs, for at::vec::Vectorized, so that the
// CPU kernels run the very same formulas on whole SIMD registers.
//
// They live in Vectorized's own namespace, where argument-dependent lookup finds them from
// the formulas whatever the order of includes.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../../activation.h"
#include "../../dispatch.h"

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

}  // namespace CPU_CAPABILITY
}  // namespace at::vec

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

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
