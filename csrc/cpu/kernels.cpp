// CPU implementations of the handgrad ops.
//
// The matrix products go through ATen's BLAS: the forward's as at::addmm, which adds the
// bias inside the product and rounds once, exactly as F.linear does. Everything else is
// written here: the activation pass of the forward, the pass that makes dl/df and the bias
// gradient together in the backward, and the standalone activations. Each loop runs the
// formulas of csrc/activation.h on at::vec::Vectorized registers, in the accumulation
// type (bfloat16 and float16 are widened to float), split across threads with
// at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/narrow.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "vectorized.h"

namespace handgrad {
namespace {

// About this many elements per task: ATen's own grain size for elementwise kernels.
constexpr int64_t kGrainElements = 32768;

#define HANDGRAD_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Rows per cache block, so that a block of the input and of the output fit in L2 together.
//
// Blocking pays where the matrix product does little work per row (a small weight): there
// the passes over memory dominate, and a block's epilogue (or, in the backward, its
// dl/df) is done while the block is still in cache. With a large weight the product
// dominates, and BLAS is faster on the whole matrix than on blocks, one per thread; then
// the "block" is all rows. Measured on 2-core AVX-512: blocking gave the forward 0.99-1.01x
// the bare product at K = M <= 256, and 1.15-1.18x at K = M >= 512.
int64_t cache_block_rows(int64_t rows, int64_t in_features, int64_t out_features,
                         int64_t element_size) {
  constexpr int64_t kBlockBytes = 256 * 1024, kLargestBlockedWeight = 256 * 256;
  if (in_features * out_features > kLargestBlockedWeight) return std::max<int64_t>(rows, 1);
  const int64_t row_bytes = element_size * std::max<int64_t>(1, in_features + out_features);
  return std::max<int64_t>(16, kBlockBytes / row_bytes);
}

// out = a[input], elementwise over contiguous memory (out may be input).
//
// Each thread's share runs in pairs of SIMD registers and its last few elements one by one,
// the way ATen's elementwise kernels (cpu_kernel_vec) walk memory: the vectorized and the
// scalar exp can differ in the last bit, and so a sigmoid over the same elements gives
// eager's values to the last bit.
template <typename scalar_t, Activation A>
void activation_forward_flat(const scalar_t* input, scalar_t* out, int64_t numel,
                             double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const Vec slope(negative_slope);
  const auto scalar_slope = static_cast<opmath_t>(negative_slope);
  constexpr int64_t kStep = 2 * at::vec::Vectorized<scalar_t>::size();
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    const int64_t vectorized_end = begin + (end - begin) / kStep * kStep;
    at::vec::map([&](Vec f) { return activate<A>(f, slope); }, out + begin, input + begin,
                 vectorized_end - begin);
    for (int64_t i = vectorized_end; i < end; ++i) {
      out[i] = static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(input[i]), scalar_slope));
    }
  });
}

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
      at::vec::map2([&](Vec f, Vec b) { return activate<A>(f + b, slope); }, row, row, bias, cols);
    }
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

// The bias gradient is summed in a cascade, so that its error grows with log(rows), as in
// eager's summation, not with rows: runs of kRunRows rows are summed one after another, a
// block adds up its kSumRows / kRunRows runs, and the blocks' sums are added pairwise.
constexpr int64_t kRunRows = 8, kSumRows = 64;

// total[j] = sum over blocks of sums[block, j], added pairwise in a fixed tree, so that the
// result is accurate and does not depend on how the blocks were shared among threads.
// Overwrites sums.
template <typename scalar_t, typename opmath_t>
void add_blocks_pairwise(opmath_t* sums, int64_t num_blocks, int64_t cols, scalar_t* total) {
  using Vec = at::vec::Vectorized<opmath_t>;
  for (int64_t stride = 1; stride < num_blocks; stride *= 2) {
    for (int64_t block = 0; block + stride < num_blocks; block += 2 * stride) {
      at::vec::map2([](Vec a, Vec b) { return a + b; }, sums + block * cols, sums + block * cols,
                    sums + (block + stride) * cols, cols);
    }
  }
  at::vec::convert(sums, total, cols);
}

// One pass over a contiguous (rows, cols) gradient: grad_pre = grad * a'[f], and
// grad_bias[j] = sum_i grad_pre[i, j] accumulated in the accumulation type (the sums of the
// rounded grad_pre, as eager's grad.sum(0)).
//
// The blocks of kSumRows rows and the tree that adds their sums depend on the shape alone,
// never on the thread count, so the bias gradient is the same bit for bit on every run.
template <typename scalar_t, Activation A>
void bias_activation_backward_rows(const scalar_t* grad, const scalar_t* saved,
                                   scalar_t* grad_pre, scalar_t* grad_bias, int64_t rows,
                                   int64_t cols, double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const Vec slope(negative_slope);
  const int64_t num_blocks = std::max<int64_t>(1, at::divup(rows, kSumRows));
  std::vector<opmath_t> block_sums(num_blocks * cols, opmath_t(0));
  const int64_t grain_blocks = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(kSumRows * cols, 1));

  at::parallel_for(0, num_blocks, grain_blocks, [&](int64_t first_block, int64_t last_block) {
    std::vector<opmath_t> widened_row(std::is_same_v<scalar_t, opmath_t> ? 0 : cols);
    std::vector<opmath_t> run(cols);
    const auto add = [](Vec sum, Vec x) { return sum + x; };
    for (int64_t block = first_block; block < last_block; ++block) {
      opmath_t* sums = block_sums.data() + block * cols;
      const int64_t row_end = std::min(rows, (block + 1) * kSumRows);
      for (int64_t i = block * kSumRows; i < row_end; ++i) {
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
        if (i % kRunRows == 0) {
          std::copy_n(row, cols, run.data());
        } else {
          at::vec::map2(add, run.data(), run.data(), row, cols);
        }
        if (i % kRunRows == kRunRows - 1 || i == row_end - 1) {
          at::vec::map2(add, sums, sums, run.data(), cols);
        }
      }
    }
  });

  add_blocks_pairwise(block_sums.data(), num_blocks, cols, grad_bias);
}

// A dense input as it is (whatever its memory format), anything else made contiguous in
// its suggested memory format: the elementwise kernels then walk memory in order, and
// empty_like gives the output the input's memory format (channels_last, transposed), as
// eager's elementwise ops do.
at::Tensor dense_or_contiguous(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

// t as a (rows, cols) matrix: itself if it is one already (reshape costs a dispatch, which a
// tiny layer notices), else a view where one exists, else a copy.
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

at::Tensor linear_activation_cpu(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, double negative_slope) {
  const Activation act = parse_activation(activation);
  check_linear_arguments({"linear_", activation, ""}, input, weight, bias, negative_slope);

  const int64_t rows = leading_rows(input);
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  // The output in its final shape, never a view of a buffer: in-place ops on it then work
  // as on F.linear's. The kernels fill it through a (rows, out_features) view.
  at::Tensor out = at::empty(linear_output_sizes(input, weight), input.options());
  const at::Tensor out_rows = as_rows(out, rows, out_features);
  const at::Tensor x = as_rows(input, rows, in_features);
  const at::Tensor weight_t = weight.t();
  const at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t block_rows =
      cache_block_rows(rows, in_features, out_features, input.element_size());
  HANDGRAD_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_activation_cpu", [&] {
    const scalar_t* bias_data = bias.has_value() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto tag) {
      // f = beta + h Omega^T, then a[f] in place: a block of rows at a time, while the block
      // is still in cache. Inside the parallel region ATen, BLAS and the passes over the
      // block run on the calling thread.
      //   bfloat16, float16: beta is added inside the product (BLAS with beta = 1 on rows
      //     holding the bias: what F.linear's addmm does), whose float32 accumulator is
      //     rounded once; rounding the product to 8 bits first would lose beta + h Omega^T
      //     wherever the two nearly cancel.
      //   float32, float64 in one block: the same, so that the output is F.linear's to the
      //     last bit (the same BLAS call).
      //   float32, float64 in blocks: the product alone, then beta and a[.] in one pass
      //     while the block is in cache (10-15 % faster at 16384x256x256, measured; the
      //     product is in float32 already, so the bias is still rounded once).
      constexpr Activation A = decltype(tag)::value;
      const bool bias_inside_product =
          bias_data != nullptr && (c10::is_reduced_floating_point_v<scalar_t> || block_rows >= rows);
      const auto gemm_and_activation = [&](int64_t row, int64_t count) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set per thread
        const bool whole = count == rows;  // narrow() costs a dispatch; tiny layers notice
        at::Tensor out_block = whole ? out_rows : out_rows.narrow(0, row, count);
        const at::Tensor x_block = whole ? x : x.narrow(0, row, count);
        scalar_t* data = out_block.data_ptr<scalar_t>();
        if (bias_inside_product) {
          for (int64_t i = 0; i < count; ++i) {  // out = beta in every row, then out += h Omega^T
            std::copy_n(bias_data, out_features, data + i * out_features);
          }
          at::addmm_out(out_block, out_block, x_block, weight_t);
        } else {
          at::mm_out(out_block, x_block, weight_t);
        }
        if (bias_data != nullptr && !bias_inside_product) {
          bias_activation_rows<scalar_t, A>(data, bias_data, count, out_features, negative_slope);
        } else {
          activation_forward_flat<scalar_t, A>(data, data, count * out_features, negative_slope);
        }
      };
      if (block_rows >= rows) {
        gemm_and_activation(0, rows);  // one block: BLAS and the activation use every thread
        return;
      }
      at::parallel_for(0, at::divup(rows, block_rows), 1, [&](int64_t first, int64_t last) {
        for (int64_t block = first; block < last; ++block) {
          const int64_t row = block * block_rows;
          gemm_and_activation(row, std::min(block_rows, rows - row));
        }
      });
    });
  });
  return out;
}

at::Tensor activation_cpu(const at::Tensor& input, c10::string_view activation,
                          double negative_slope) {
  const Activation act = parse_activation(activation);
  check_activation_arguments({"", activation, ""}, input, negative_slope);

  const at::Tensor x = dense_or_contiguous(input);
  at::Tensor out = at::empty_like(x);  // x's strides: the same memory order
  HANDGRAD_DISPATCH_FLOATING_TYPES(x.scalar_type(), "activation_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      activation_forward_flat<scalar_t, decltype(tag)::value>(
          x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), negative_slope);
    });
  });
  return out;
}

void activation_inplace_cpu(const at::Tensor& input, c10::string_view activation,
                            double negative_slope) {
  const Activation act = parse_activation(activation);
  check_activation_arguments({"", activation, "_"}, input, negative_slope);
  if (!input.is_non_overlapping_and_dense()) {
    // A strided view: compute aside and copy back; copy_ refuses overlapping memory.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    input.copy_(activation_cpu(input, activation, negative_slope));
    return;
  }
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "activation_inplace_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      scalar_t* data = input.data_ptr<scalar_t>();
      activation_forward_flat<scalar_t, decltype(tag)::value>(data, data, input.numel(),
                                                              negative_slope);
    });
  });
}

at::Tensor activation_backward_cpu(const at::Tensor& grad_output, const at::Tensor& saved,
                                   c10::string_view activation, double negative_slope) {
  const Activation act = parse_activation(activation);
  check_backward_arguments({"", activation, "_backward"}, grad_output, saved, negative_slope);

  // dl/df in saved's memory format; grad_output is copied only if its strides differ.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor s = dense_or_contiguous(saved);
  const at::Tensor grad =
      grad_output.strides() == s.strides() ? grad_output : at::empty_like(s).copy_(grad_output);
  at::Tensor grad_pre = at::empty_like(s);
  HANDGRAD_DISPATCH_FLOATING_TYPES(s.scalar_type(), "activation_backward_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      activation_backward_flat<scalar_t, decltype(tag)::value>(
          grad.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
          grad_pre.data_ptr<scalar_t>(), grad_pre.numel(), negative_slope);
    });
  });
  return grad_pre;
}

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& saved, c10::string_view activation,
    double negative_slope) {
  const Activation act = parse_activation(activation);
  check_bias_backward_arguments({"bias_", activation, "_backward"}, grad_output, saved,
                                negative_slope);

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  check_linear_backward_arguments({"linear_", activation, "_backward"}, grad_output, input,
                                  weight, saved, negative_slope);
  // The ATen ops below compute values only: no autograd graph for them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const int64_t rows = leading_rows(input);
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  const at::Tensor grad = as_rows(grad_output, rows, out_features).contiguous();
  const at::Tensor saved_rows = as_rows(saved, rows, out_features).contiguous();
  const at::Tensor x = as_rows(input, rows, in_features);
  const auto [need_input, need_weight, need_bias] = output_mask;
  at::Tensor grad_input, grad_weight, grad_bias;

  int64_t block_rows = cache_block_rows(rows, in_features, out_features, input.element_size());
  if (at::isReducedFloatingType(input.scalar_type())) {
    // Blocks would round dl/dOmega to bfloat16/float16 once per block; the whole product
    // rounds once, as eager's does.
    block_rows = std::max<int64_t>(rows, 1);
  }
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_activation_backward_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      if (block_rows >= rows) {
        // One pass for dl/df, then the products on the whole matrix and dl/dbeta as eager's
        // addmm backward makes them (grad.sum(0)): a layer that fits one block gets eager's
        // gradients to the last bit.
        at::Tensor grad_pre = at::empty({rows, out_features}, input.options());
        activation_backward_flat<scalar_t, A>(
            grad.const_data_ptr<scalar_t>(), saved_rows.const_data_ptr<scalar_t>(),
            grad_pre.data_ptr<scalar_t>(), grad_pre.numel(), negative_slope);
        if (need_input) grad_input = at::mm(grad_pre, weight);      // (7.6)
        if (need_weight) grad_weight = at::mm(grad_pre.t(), x);     // (7.9)
        if (need_bias) grad_bias = at::sum(grad_pre, 0);
        return;
      }
      // Cache-blocked: each block's dl/df is made, used for its rows of dl/dh and added into
      // this thread's share of dl/dOmega while it is still in cache, and never written out
      // whole. The bias sums of the blocks are added pairwise (deterministic).
      const int64_t num_blocks = at::divup(rows, block_rows);
      if (need_input) grad_input = at::empty({rows, in_features}, input.options());
      at::Tensor block_bias_sums = at::empty({num_blocks, out_features}, input.options());
      at::Tensor weight_shares = need_weight
          ? at::zeros({at::get_num_threads(), out_features, in_features}, input.options())
          : at::Tensor();
      at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set per thread
        at::Tensor grad_pre = at::empty({block_rows, out_features}, input.options());
        at::Tensor weight_share = need_weight ? weight_shares[at::get_thread_num()] : at::Tensor();
        for (int64_t block = first; block < last; ++block) {
          const int64_t row = block * block_rows, count = std::min(block_rows, rows - row);
          at::Tensor grad_pre_block = grad_pre.narrow(0, 0, count);
          bias_activation_backward_rows<scalar_t, A>(
              grad.const_data_ptr<scalar_t>() + row * out_features,
              saved_rows.const_data_ptr<scalar_t>() + row * out_features,
              grad_pre_block.data_ptr<scalar_t>(), block_bias_sums[block].data_ptr<scalar_t>(),
              count, out_features, negative_slope);
          if (need_input) {
            at::Tensor grad_input_block = grad_input.narrow(0, row, count);
            at::mm_out(grad_input_block, grad_pre_block, weight);
          }
          if (need_weight) weight_share.addmm_(grad_pre_block.t(), x.narrow(0, row, count));
        }
      });
      if (need_weight) grad_weight = weight_shares.sum(0);
      if (need_bias) {
        grad_bias = at::empty({out_features}, input.options());
        add_blocks_pairwise(block_bias_sums.data_ptr<scalar_t>(), num_blocks, out_features,
                            grad_bias.data_ptr<scalar_t>());
      }
    });
  });
  if (need_input) grad_input = grad_input.view(input.sizes());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("linear_activation", &linear_activation_cpu);
  m.impl("activation", &activation_cpu);
  m.impl("activation_", &activation_inplace_cpu);
  m.impl("activation_backward", &activation_backward_cpu);
  m.impl("bias_activation_backward", &bias_activation_backward_cpu);
  m.impl("linear_activation_backward", &linear_activation_backward_cpu);
}

}  // namespace handgrad
