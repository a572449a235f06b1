// The two primitives that csrc/activation.h needs, for at::vec::Vectorized, so that the
// CPU kernels run the very same formulas on whole SIMD registers.
//
// They live in Vectorized's own namespace, where argument-dependent lookup finds them from
// the formulas whatever the order of includes.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../activation.h"

// The dtypes of every CPU kernel: float and double, and bfloat16 and float16 computed in float.
#define HANDGRAD_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

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
