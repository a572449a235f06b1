// Shapes and layouts shared by the kernels, the checks (csrc/checks.h) and the autograd
// kernels. The checkpoint policy is in checkpoint.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/DimVector.h>
#include <c10/util/SmallVector.h>
#include <c10/util/accumulate.h>

#include <cstddef>
#include <cstdint>

namespace handgrad {

// The shape of a linear layer's output (or of its gradient): the input's leading
// dimensions, then out_features. T is int64_t, or c10::SymInt for the checks.
template <typename T>
c10::SmallVector<T, c10::kDimVectorStaticSize> linear_output_sizes(c10::ArrayRef<T> input_sizes,
                                                                  const T& out_features) {
  c10::SmallVector<T, c10::kDimVectorStaticSize> sizes(input_sizes.begin(), input_sizes.end());
  sizes.back() = out_features;
  return sizes;
}

// Rows of a (*, features) tensor seen as a matrix; works for zero sizes too.
inline int64_t leading_rows(c10::IntArrayRef sizes) {
  return c10::multiply_integers(sizes.begin(), sizes.end() - 1);
}

// (*, features) as a (rows, features) matrix, zero sizes included: a view where one can be.
inline at::Tensor as_matrix(const at::Tensor& t) {
  return t.dim() == 2 ? t : t.reshape({leading_rows(t.sizes()), t.size(-1)});
}

// A dense tensor as it is (whatever its memory format), anything else made contiguous in
// its suggested memory format: the elementwise kernels then walk memory in order, and
// empty_like gives the output the tensor's memory format (channels_last, transposed), as
// eager's elementwise ops do.
inline at::Tensor dense_or_contiguous(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

}  // namespace handgrad
