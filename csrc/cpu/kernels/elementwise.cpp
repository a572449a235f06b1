// The elementwise CPU kernels: the standalone activations and their backward, and the pass
// that makes dl/df and the bias gradient together. Each loop runs the formulas of
// csrc/activation.h on SIMD lanes (Lanes, vectorized.h), in the accumulation type (bfloat16
// and float16 are widened to float), split across threads as ATen splits its own.
#include <ATen/ceil_div.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../../dispatch.h"
#include "../../shapes.h"
#include "entry_points.h"
#include "vectorized.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// About this many elements per task: ATen's own grain size for elementwise kernels.
constexpr int64_t kGrainElements = 32768;

// body(begin, end) over [0, numel) in the pieces ATen's at::parallel_for gives its threads
// (ATen/ParallelOpenMP.h: as many pieces as threads, at most one per grain, of equal size),
// run on those threads, or one after another where this library was built without OpenMP:
// the pieces, and so the bits, are eager's either way.
template <typename Body>
void in_atens_pieces(int64_t numel, int64_t grain, const Body& body) {
  const int64_t threads = at::get_num_threads();
  if (numel <= grain || threads == 1 || at::in_parallel_region()) {
    body(int64_t{0}, numel);
    return;
  }
  const int64_t pieces = std::min(threads, at::ceil_div(numel, grain));
  const int64_t size = at::ceil_div(numel, pieces);
  at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
    for (int64_t piece = first; piece < last; ++piece) {
      body(piece * size, std::min(numel, (piece + 1) * size));
    }
  });
}

// [begin, end) walked as ATen's elementwise kernels (cpu_kernel_vec) walk a thread's share:
// pairs of SIMD registers of scalar_t, by vectorized(begin, split), then the last few
// elements one by one, by one_by_one(i). The vectorized and the scalar exp can differ in the
// last bit, so a kernel that walks the same elements the same way gives eager's bits.
template <typename scalar_t, typename Vectorized, typename OneByOne>
void as_eager_walks(int64_t begin, int64_t end, const Vectorized& vectorized, const OneByOne& one_by_one) {
  constexpr int64_t kStep = 2 * at::vec::Vectorized<scalar_t>::size();
  const int64_t split = begin + (end - begin) / kStep * kStep;
  vectorized(begin, split);
  for (int64_t i = split; i < end; ++i) one_by_one(i);
}

// out = a[input], elementwise over contiguous memory (out may be input).
template <typename scalar_t, Activation A>
void activation_forward_flat(const scalar_t* input, scalar_t* out, int64_t numel,
                             const ActivationParameters& params) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Lanes<opmath_t>;
  const ActivationConstants<V> k(params);
  const ActivationConstants<opmath_t> scalar_k(params);
  in_atens_pieces(numel, kGrainElements, [&](int64_t begin, int64_t end) {
    if constexpr (A == Activation::Tanh) {  // eager's VML over the whole share, where it has one
      if (tanh_as_eager(input + begin, out + begin, end - begin)) return;
    }
    as_eager_walks<scalar_t>(
        begin, end,
        [&](int64_t first, int64_t last) {
          map_lanes([&](V f) { return activate<A>(f, k); }, out + first, input + first, last - first);
        },
        [&](int64_t i) {
          out[i] = static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(input[i]), scalar_k));
        });
  });
}

// grad_pre = grad * a'[f], elementwise over contiguous memory.
template <typename scalar_t, Activation A>
void activation_backward_flat(const scalar_t* grad, const scalar_t* out_or_f, scalar_t* grad_pre,
                              int64_t numel, const ActivationParameters& params) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Lanes<opmath_t>;
  const ActivationConstants<V> k(params);
  const ActivationConstants<opmath_t> scalar_k(params);
  in_atens_pieces(numel, kGrainElements, [&](int64_t begin, int64_t end) {
    as_eager_walks<scalar_t>(
        begin, end,
        [&](int64_t first, int64_t last) {
          map2_lanes([&](V g, V s) { return activation_backward<A>(g, s, k); },
                        grad_pre + first, grad + first, out_or_f + first, last - first);
        },
        [&](int64_t i) {
          grad_pre[i] = static_cast<scalar_t>(activation_backward<A>(
              static_cast<opmath_t>(grad[i]), static_cast<opmath_t>(out_or_f[i]), scalar_k));
        });
  });
}

// The bias gradient is summed in a cascade, so that its error grows with log(rows), as in
// eager's summation, not with rows: runs of kRunRows rows (add_row_to_sums), a block adds up
// its kSumBlockRows / kRunRows runs, and the blocks' sums are added pairwise.
constexpr int64_t kSumBlockRows = 64;

// One pass over a contiguous (rows, cols) gradient: grad_pre = grad * a'[f], and
// grad_bias[j] = sum_i grad_pre[i, j] accumulated in the accumulation type (the sums of the
// rounded grad_pre, as eager's grad.sum(0)).
//
// The blocks of kSumBlockRows rows and the tree that adds their sums depend on the shape alone,
// never on the thread count, so the bias gradient is the same bit for bit on every run.
template <typename scalar_t, Activation A>
void bias_activation_backward_rows(const scalar_t* grad, const scalar_t* out_or_f,
                                   scalar_t* grad_pre, scalar_t* grad_bias, int64_t rows,
                                   int64_t cols, const ActivationParameters& params) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Lanes<opmath_t>;
  const ActivationConstants<V> k(params);
  const int64_t num_blocks = std::max<int64_t>(1, at::ceil_div<int64_t>(rows, kSumBlockRows));
  std::vector<opmath_t> block_sums(num_blocks * cols, opmath_t(0));
  const int64_t grain_blocks = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(kSumBlockRows * cols, 1));

  at::parallel_for(0, num_blocks, grain_blocks, [&](int64_t first_block, int64_t last_block) {
    std::vector<opmath_t> widened_row(std::is_same_v<scalar_t, opmath_t> ? 0 : cols);
    std::vector<opmath_t> run(cols);
    for (int64_t block = first_block; block < last_block; ++block) {
      opmath_t* sums = block_sums.data() + block * cols;
      const int64_t row_end = std::min(rows, (block + 1) * kSumBlockRows);
      for (int64_t i = block * kSumBlockRows; i < row_end; ++i) {
        scalar_t* grad_pre_row = grad_pre + i * cols;
        map2_lanes([&](V g, V s) { return activation_backward<A>(g, s, k); },
                      grad_pre_row, grad + i * cols, out_or_f + i * cols, cols);
        const opmath_t* row = nullptr;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          row = grad_pre_row;
        } else {
          at::vec::convert(grad_pre_row, widened_row.data(), cols);
          row = widened_row.data();
        }
        add_row_to_sums(i - block * kSumBlockRows, i == row_end - 1, row, run.data(), sums, cols);
      }
    }
  });

  // The blocks' sums added pairwise (csrc/cpu/vectorized.h), rounded once.
  add_pairwise(block_sums.data(), num_blocks, cols, cols);
  at::vec::convert(block_sums.data(), grad_bias, cols);
}

}  // namespace

void activation_kernel(const at::Tensor& input, const at::Tensor& out, Activation act,
                const ActivationParameters& params) {
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "activation_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      activation_forward_flat<scalar_t, decltype(tag)::value>(
          input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), input.numel(), params);
    });
  });
}

void activation_backward_kernel(const at::Tensor& grad, const at::Tensor& out_or_f,
                         const at::Tensor& grad_pre, Activation act, const ActivationParameters& params) {
  HANDGRAD_DISPATCH_FLOATING_TYPES(out_or_f.scalar_type(), "activation_backward_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      activation_backward_flat<scalar_t, decltype(tag)::value>(
          grad.const_data_ptr<scalar_t>(), out_or_f.const_data_ptr<scalar_t>(),
          grad_pre.data_ptr<scalar_t>(), grad_pre.numel(), params);
    });
  });
}

void bias_activation_backward_kernel(const at::Tensor& grad, const at::Tensor& out_or_f,
                              const at::Tensor& grad_pre, const at::Tensor& grad_bias,
                              Activation act, const ActivationParameters& params) {
  const int64_t rows = leading_rows(out_or_f.sizes()), cols = out_or_f.size(-1);
  HANDGRAD_DISPATCH_FLOATING_TYPES(out_or_f.scalar_type(), "bias_activation_backward_cpu", [&] {
    dispatch_activation(act, [&](auto tag) {
      bias_activation_backward_rows<scalar_t, decltype(tag)::value>(
          grad.const_data_ptr<scalar_t>(), out_or_f.const_data_ptr<scalar_t>(),
          grad_pre.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(), rows, cols,
          params);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
