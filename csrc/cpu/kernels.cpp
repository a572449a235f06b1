// CPU implementations of the handgrad ops.
//
// The matrix products go through ATen's BLAS (at::mm). Everything else is written here:
// the bias + activation epilogue of the forward, the pass that makes dl/df and the bias
// gradient together in the backward, and the standalone activations. Each loop runs the
// formulas of csrc/activation.h on at::vec::Vectorized registers, in the accumulation
// type (bfloat16 is widened to float), split across threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "vectorized.h"

namespace handgrad {
namespace {

// About this many elements per task: ATen's own grain size for elementwise kernels.
constexpr int64_t kGrainElements = 32768;

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls body(ActivationTag<A>{}) with the activation as a compile-time constant, so that
// the inner loops carry no branch on it.
template <typename Body>
void dispatch_activation(Activation activation, const Body& body) {
  switch (activation) {
    case Activation::ReLU: return body(ActivationTag<Activation::ReLU>{});
    case Activation::LeakyReLU: return body(ActivationTag<Activation::LeakyReLU>{});
    case Activation::Sigmoid: return body(ActivationTag<Activation::Sigmoid>{});
  }
}

#define HANDGRAD_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// out[i, :] = a[out[i, :] + bias], in place on a contiguous (rows, cols) matrix.
template <typename scalar_t, Activation A>
void bias_activation_rows(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols,
                          double negative_slope) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec slope(negative_slope);
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = out + i * cols;
      if (bias != nullptr) {
        at::vec::map2([&](Vec f, Vec b) { return activate<A>(f + b, slope); }, row, row, bias,
                      cols);
      } else {
        at::vec::map([&](Vec f) { return activate<A>(f, slope); }, row, row, cols);
      }
    }
  });
}

// out = a[input], elementwise over contiguous memory.
template <typename scalar_t, Activation A>
void activation_forward_flat(const scalar_t* input, scalar_t* out, int64_t numel,
                             double negative_slope) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec slope(negative_slope);
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    at::vec::map([&](Vec f) { return activate<A>(f, slope); }, out + begin, input + begin,
                 end - begin);
  });
}

// grad_pre = grad * a'[f], elementwise over contiguous memory.
template <typename scalar_t, Activation A>
void activation_backward_flat(const scalar_t* grad, const scalar_t* saved, scalar_t* grad_pre,
                              int64_t numel, double negative_slope) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec slope(negative_slope);
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    at::vec::map2([&](Vec g, Vec s) { return activation_backward<A>(g, s, slope); },
                  grad_pre + begin, grad + begin, saved + begin, end - begin);
  });
}

// One pass over a contiguous (rows, cols) gradient: grad_pre = grad * a'[f], and
// grad_bias[j] = sum_i grad_pre[i, j] accumulated in the accumulation type.
//
// The rows are cut into blocks whose size depends on `cols` alone, never on the thread
// count, and the blocks' partial sums are added in block order, so the bias gradient is
// the same bit for bit on every run.
template <typename scalar_t, Activation A>
void bias_activation_backward_rows(const scalar_t* grad, const scalar_t* saved,
                                   scalar_t* grad_pre, scalar_t* grad_bias, int64_t rows,
                                   int64_t cols, double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const Vec slope(negative_slope);
  const int64_t block_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  const int64_t num_blocks = std::max<int64_t>(1, at::divup(rows, block_rows));
  std::vector<opmath_t> block_sums(num_blocks * cols, opmath_t(0));

  at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t last_block) {
    std::vector<opmath_t> widened_row(std::is_same_v<scalar_t, opmath_t> ? 0 : cols);
    for (int64_t block = first_block; block < last_block; ++block) {
      opmath_t* sums = block_sums.data() + block * cols;
      const int64_t row_end = std::min(rows, (block + 1) * block_rows);
      for (int64_t i = block * block_rows; i < row_end; ++i) {
        scalar_t* grad_pre_row = grad_pre + i * cols;
        at::vec::map2([&](Vec g, Vec s) { return activation_backward<A>(g, s, slope); },
                      grad_pre_row, grad + i * cols, saved + i * cols, cols);
        const opmath_t* row = nullptr;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          row = grad_pre_row;
        } else {
          at::vec::convert(grad_pre_row, widened_row.data(), cols);
          row = widened_row.data();
        }
        at::vec::map2([](Vec sum, Vec x) { return sum + x; }, sums, sums, row, cols);
      }
    }
  });

  opmath_t* total = block_sums.data();
  for (int64_t block = 1; block < num_blocks; ++block) {
    at::vec::map2([](Vec sum, Vec x) { return sum + x; }, total, total,
                  block_sums.data() + block * cols, cols);
  }
  at::vec::convert(total, grad_bias, cols);
}

at::Tensor linear_activation_cpu(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, double negative_slope) {
  const Activation act = parse_activation(activation);
  const std::string op = op_name(activation, /*fused_with_linear=*/true);
  check_linear_arguments(op, input, weight, bias, negative_slope, /*half_supported=*/false);

  const int64_t rows = leading_rows(input);
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  std::vector<int64_t> out_sizes = input.sizes().vec();
  out_sizes.back() = out_features;

  // f = h Omega^T by BLAS (beta is added below); mm returns a fresh contiguous matrix.
  at::Tensor out = at::mm(input.reshape({rows, in_features}), weight.t()).contiguous();
  const at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();
  HANDGRAD_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_activation_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      bias_activation_rows<scalar_t, decltype(tag)::value>(
          out.data_ptr<scalar_t>(),
          bias_contiguous.defined() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr, rows,
          out_features, negative_slope);
    });
  });
  return out.view(out_sizes);
}

at::Tensor activation_cpu(const at::Tensor& input, c10::string_view activation,
                          double negative_slope) {
  const Activation act = parse_activation(activation);
  check_activation_arguments(op_name(activation, false), input, negative_slope, false);

  const at::Tensor input_contiguous = input.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "activation_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      activation_forward_flat<scalar_t, decltype(tag)::value>(input_contiguous.const_data_ptr<scalar_t>(),
                                           out.data_ptr<scalar_t>(), out.numel(),
                                           negative_slope);
    });
  });
  return out;
}

at::Tensor activation_backward_cpu(const at::Tensor& grad_output, const at::Tensor& saved,
                                   c10::string_view activation, double negative_slope) {
  const Activation act = parse_activation(activation);
  check_backward_arguments(op_name(activation, false) + "_backward", grad_output, saved,
                           negative_slope, false);

  const at::Tensor grad = grad_output.contiguous(), saved_contiguous = saved.contiguous();
  at::Tensor grad_pre = at::empty(saved.sizes(), saved.options());
  HANDGRAD_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "activation_backward_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      activation_backward_flat<scalar_t, decltype(tag)::value>(
          grad.const_data_ptr<scalar_t>(), saved_contiguous.const_data_ptr<scalar_t>(),
          grad_pre.data_ptr<scalar_t>(), grad_pre.numel(), negative_slope);
    });
  });
  return grad_pre;
}

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& saved, c10::string_view activation,
    double negative_slope) {
  const Activation act = parse_activation(activation);
  const std::string op = op_name(activation, true) + "_backward";
  check_backward_arguments(op, grad_output, saved, negative_slope, false);
  TORCH_CHECK(saved.dim() >= 1, op, ": saved must have shape (*, out_features), got a 0-D tensor");

  const int64_t rows = leading_rows(saved), cols = saved.size(-1);
  const at::Tensor grad = grad_output.contiguous(), saved_contiguous = saved.contiguous();
  at::Tensor grad_pre = at::empty(saved.sizes(), saved.options());
  at::Tensor grad_bias = at::empty({cols}, saved.options());
  HANDGRAD_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "bias_activation_backward_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      bias_activation_backward_rows<scalar_t, decltype(tag)::value>(
          grad.const_data_ptr<scalar_t>(), saved_contiguous.const_data_ptr<scalar_t>(),
          grad_pre.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(), rows, cols,
          negative_slope);
    });
  });
  return {grad_pre, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("linear_activation", &linear_activation_cpu);
  m.impl("activation", &activation_cpu);
  m.impl("activation_backward", &activation_backward_cpu);
  m.impl("bias_activation_backward", &bias_activation_backward_cpu);
}

}  // namespace handgrad
