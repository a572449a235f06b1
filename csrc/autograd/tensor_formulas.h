// The double backward's formula of csrc/activation.h on whole tensors, as differentiable
// ATen expressions: for the autograd kernels (a third order differentiates them again) and,
// through handgrad._C, the Python ones.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/tanh.h>

#include "../activation.h"

namespace handgrad {

template <>
struct constant_of<at::Tensor> { using type = double; };  // a Scalar in tensor expressions

// d(a')/d(out_or_f) for out_or_f the tensor a' is read off (csrc/activation.h).
inline at::Tensor derivative_of_derivative(Activation activation, const at::Tensor& out_or_f,
                                           const ActivationParameters& params) {
  at::Tensor out;
  dispatch_activation(activation, [&](auto tag) {
    out = derivative_of_derivative<decltype(tag)::value>(out_or_f, ActivationConstants<double>(params));
  });
  return out;
}

}  // namespace handgrad
