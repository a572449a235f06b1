// CUDA implementations of the handgrad ops.
//
// The matrix products go through cuBLAS via ATen: the forward's as at::addmm, whose bias
// is added inside the product (cuBLASLt's bias epilogue where it applies, with ReLU's too)
// and rounded once, exactly as F.linear does. The rest is hand-written here and runs the
// formulas of
// csrc/activation.h, the same ones the CPU kernels use: the activation pass of the forward,
// the pass that makes dl/df and the bias gradient together, and the standalone
// activations. Half types are computed in float (at::opmath_type).
//
// Every kernel is launched on the current stream with no host synchronisation, so a
// forward+backward can be captured in a CUDA graph; every launch is checked. The bias
// gradient is reduced in two passes over a partition of the rows that depends on the shape
// alone, with pairwise sums and without atomics: accurate, and the same bit for bit on every
// run.
#include <ATen/ceil_div.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/_addmm_activation.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>

#include "../activation.h"
#include "../checks.h"
#include "../dispatch.h"

namespace handgrad {
namespace {

constexpr int kThreads = 256;

// A group of N elements read or written with one 16-byte access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T value[N];
};

// Elements per 16-byte access: 4 floats, 2 doubles, 8 halves or bfloat16s.
template <typename scalar_t>
constexpr int kPack = 16 / sizeof(scalar_t);

bool aligned(const void* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
}

int64_t blocks_for(int64_t work_items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::ceil_div<int64_t>(work_items, kThreads), 1 << 20));
}

// out = a[input] (BACKWARD false) or out = grad * a'(out_or_f) (BACKWARD true), elementwise over
// memory in order: packs of PACK elements, then a scalar tail. out may be input (in place).
template <typename scalar_t, Activation A, bool BACKWARD, int PACK>
__global__ void elementwise_kernel(scalar_t* out, const scalar_t* first, const scalar_t* second,
                                   int64_t numel, ActivationConstants<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, PACK>;
  const auto apply = [&](scalar_t x, scalar_t y) {
    if constexpr (BACKWARD) {
      return static_cast<scalar_t>(
          activation_backward<A>(static_cast<opmath_t>(x), static_cast<opmath_t>(y), k));
    } else {
      return static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(x), k));
    }
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t packs = numel / PACK;
  for (int64_t p = start; p < packs; p += stride) {
    const PackT x = reinterpret_cast<const PackT*>(first)[p];
    PackT y = x;
    if constexpr (BACKWARD) y = reinterpret_cast<const PackT*>(second)[p];
    PackT result;
#pragma unroll
    for (int k = 0; k < PACK; ++k) result.value[k] = apply(x.value[k], y.value[k]);
    reinterpret_cast<PackT*>(out)[p] = result;
  }
  for (int64_t i = packs * PACK + start; i < numel; i += stride) {
    out[i] = apply(first[i], BACKWARD ? second[i] : first[i]);
  }
}

// dl/df over a (rows, cols) matrix: grad_pre = grad * a'(out_or_f), where grad may have any
// strides (an expanded gradient is read in place, never copied) and out_or_f and grad_pre are
// contiguous. With BIAS, also the column sums of each chunk of rows_per_chunk rows into
// partial[chunk, :], in opmath: the sums of the rounded grad_pre, as eager's grad.sum(0).
//
// Block (tx, ty) = (blockDim.x, blockDim.y): x walks tx packs of PACK columns, y the chunk's
// rows. PACK > 1 only where grad's columns are contiguous and every row of all three
// matrices starts 16-byte aligned.
template <typename scalar_t, Activation A, int PACK, bool BIAS>
__global__ void activation_backward_2d_kernel(
    const scalar_t* grad, int64_t grad_row_stride, int64_t grad_col_stride,
    const scalar_t* out_or_f, scalar_t* grad_pre, at::opmath_type<scalar_t>* partial, int64_t rows,
    int64_t cols, int64_t rows_per_chunk, ActivationConstants<at::opmath_type<scalar_t>> constants) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, PACK>;
  const int64_t col = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * PACK;
  const int64_t chunk = blockIdx.y;
  const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
  opmath_t acc[PACK];
#pragma unroll
  for (int k = 0; k < PACK; ++k) acc[k] = opmath_t(0);
  if (col < cols) {
    for (int64_t row = chunk * rows_per_chunk + threadIdx.y; row < row_end; row += blockDim.y) {
      const int64_t i = row * cols + col;
      PackT g;
      if constexpr (PACK > 1) {
        g = *reinterpret_cast<const PackT*>(grad + row * grad_row_stride + col);
      } else {
        g.value[0] = grad[row * grad_row_stride + col * grad_col_stride];
      }
      const PackT s = *reinterpret_cast<const PackT*>(out_or_f + i);
      PackT d;
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        d.value[k] = static_cast<scalar_t>(activation_backward<A>(
            static_cast<opmath_t>(g.value[k]), static_cast<opmath_t>(s.value[k]), constants));
        if constexpr (BIAS) acc[k] += static_cast<opmath_t>(d.value[k]);
      }
      *reinterpret_cast<PackT*>(grad_pre + i) = d;
    }
  }
  if constexpr (BIAS) {
    // The chunk's column sums: the blockDim.y partial sums of each column, added pairwise
    // (blockDim.y is a power of two), in a tree that is the same on every run.
    extern __shared__ unsigned char shared_bytes[];
    opmath_t* sums = reinterpret_cast<opmath_t*>(shared_bytes);  // [blockDim.y][blockDim.x * PACK]
    const int width = blockDim.x * PACK;
#pragma unroll
    for (int k = 0; k < PACK; ++k) sums[threadIdx.y * width + threadIdx.x * PACK + k] = acc[k];
    __syncthreads();
    for (int half = blockDim.y / 2; half > 0; half /= 2) {
      if (threadIdx.y < half) {
#pragma unroll
        for (int k = 0; k < PACK; ++k) {
          sums[threadIdx.y * width + threadIdx.x * PACK + k] +=
              sums[(threadIdx.y + half) * width + threadIdx.x * PACK + k];
        }
      }
      __syncthreads();
    }
    if (threadIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        if (col + k < cols) partial[chunk * cols + col + k] = sums[threadIdx.x * PACK + k];
      }
    }
  }
}

// Pass 2 of the bias gradient: grad_bias[j] = the sum over chunks of partial[chunk, j]. Block
// (32, kSumThreadRows): x a column, y every kSumThreadRows-th chunk in order; then the
// kSumThreadRows sums of each column are added pairwise.
constexpr int kSumThreadRows = 32;

template <typename scalar_t>
__global__ void sum_chunks_kernel(const at::opmath_type<scalar_t>* partial, scalar_t* grad_bias,
                                  int64_t chunks, int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t sums[kSumThreadRows][33];
  const int64_t col = blockIdx.x * static_cast<int64_t>(32) + threadIdx.x;
  opmath_t total = opmath_t(0);
  if (col < cols) {
    for (int64_t chunk = threadIdx.y; chunk < chunks; chunk += kSumThreadRows) {
      total += partial[chunk * cols + col];
    }
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  for (int half = kSumThreadRows / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) sums[threadIdx.y][threadIdx.x] += sums[threadIdx.y + half][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && col < cols) grad_bias[col] = static_cast<scalar_t>(sums[0][threadIdx.x]);
}

// --- Launchers ---

template <typename scalar_t, Activation A, bool BACKWARD>
void launch_elementwise(at::Tensor& out, const at::Tensor& first, const at::Tensor& second,
                        const ActivationParameters& params) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const scalar_t* first_data = first.const_data_ptr<scalar_t>();
  const scalar_t* second_data = BACKWARD ? second.const_data_ptr<scalar_t>() : nullptr;
  const ActivationConstants<at::opmath_type<scalar_t>> k(params);
  constexpr int P = kPack<scalar_t>;
  if (aligned(out_data) && aligned(first_data) && (!BACKWARD || aligned(second_data))) {
    elementwise_kernel<scalar_t, A, BACKWARD, P><<<blocks_for(numel / P + 1), kThreads, 0, stream>>>(
        out_data, first_data, second_data, numel, k);
  } else {
    elementwise_kernel<scalar_t, A, BACKWARD, 1><<<blocks_for(numel), kThreads, 0, stream>>>(
        out_data, first_data, second_data, numel, k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The partition of the dl/df pass: blocks of kThreads threads, tx packs across by ty rows,
// and enough chunks of rows for about kTargetBlocks blocks. It depends on the shape alone,
// so the bias gradient adds the same numbers in the same order on every run and device.
struct BackwardGrid {
  int tx, ty;
  int64_t column_tiles, chunks, rows_per_chunk;
};

BackwardGrid backward_grid(int64_t rows, int64_t packs_per_row) {
  constexpr int64_t kTargetBlocks = 1024;
  BackwardGrid grid;
  grid.tx = 1;
  while (grid.tx < 32 && grid.tx < packs_per_row) grid.tx *= 2;  // no idle lanes on narrow rows
  grid.ty = kThreads / grid.tx;
  grid.column_tiles = at::ceil_div<int64_t>(packs_per_row, grid.tx);
  const int64_t most_chunks = std::max<int64_t>(1, at::ceil_div<int64_t>(rows, grid.ty));
  const int64_t chunks = std::clamp<int64_t>(at::ceil_div<int64_t>(kTargetBlocks, grid.column_tiles), 1, most_chunks);
  grid.rows_per_chunk = std::max<int64_t>(1, at::ceil_div<int64_t>(rows, chunks));
  grid.chunks = std::max<int64_t>(1, at::ceil_div<int64_t>(rows, grid.rows_per_chunk));
  return grid;
}

// grad_pre = grad * a'(out_or_f) over (rows, cols) matrices, and grad_bias = its column sums
// when grad_bias is defined. grad may have any strides; out_or_f and grad_pre are contiguous.
template <typename scalar_t, Activation A>
void launch_activation_backward_2d(const at::Tensor& grad, const at::Tensor& out_or_f,
                                   at::Tensor& grad_pre, at::Tensor& grad_bias,
                                   const ActivationParameters& params) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = out_or_f.size(0), cols = out_or_f.size(1);
  const bool bias = grad_bias.defined();
  if (cols == 0) return;
  if (rows == 0) {
    if (bias) grad_bias.zero_();
    return;
  }
  constexpr int P = kPack<scalar_t>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* s = out_or_f.const_data_ptr<scalar_t>();
  scalar_t* d = grad_pre.mutable_data_ptr<scalar_t>();
  const int64_t row_stride = grad.stride(0), col_stride = grad.stride(1);
  const bool packed = cols % P == 0 && col_stride == 1 && row_stride % P == 0 && aligned(g) &&
                      aligned(s) && aligned(d);
  const BackwardGrid grid = backward_grid(rows, packed ? cols / P : cols);
  at::Tensor partial;
  opmath_t* partial_data = nullptr;
  if (bias) {
    partial = at::empty({grid.chunks, cols}, out_or_f.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    partial_data = partial.mutable_data_ptr<opmath_t>();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ActivationConstants<opmath_t> k(params);
  const dim3 blocks(grid.column_tiles, grid.chunks), threads(grid.tx, grid.ty);
  const size_t shared = bias ? sizeof(opmath_t) * kThreads * (packed ? P : 1) : 0;
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, threads, shared, stream>>>(g, row_stride, col_stride, s, d, partial_data, rows,
                                                cols, grid.rows_per_chunk, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (packed && bias) launch(activation_backward_2d_kernel<scalar_t, A, P, true>);
  if (packed && !bias) launch(activation_backward_2d_kernel<scalar_t, A, P, false>);
  if (!packed && bias) launch(activation_backward_2d_kernel<scalar_t, A, 1, true>);
  if (!packed && !bias) launch(activation_backward_2d_kernel<scalar_t, A, 1, false>);
  if (bias) {
    sum_chunks_kernel<scalar_t><<<at::ceil_div<int64_t>(cols, 32), dim3(32, kSumThreadRows), 0, stream>>>(
        partial_data, grad_bias.mutable_data_ptr<scalar_t>(), grid.chunks, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// dl/df of (rows, cols) views of grad_output and out_or_f, and dl/dbeta if need_bias.
std::tuple<at::Tensor, at::Tensor> activation_backward_matrix(
    const at::Tensor& grad_output, const at::Tensor& out_or_f, Activation act,
    const ActivationParameters& params, bool need_bias) {
  const int64_t rows = leading_rows(out_or_f.sizes()), cols = out_or_f.size(-1);
  const at::Tensor grad = grad_output.reshape({rows, cols});  // a view where it can be
  const at::Tensor saved_rows = out_or_f.reshape({rows, cols}).contiguous();
  at::Tensor grad_pre = at::empty({rows, cols}, out_or_f.options());
  at::Tensor grad_bias = need_bias ? at::empty({cols}, out_or_f.options()) : at::Tensor();
  HANDGRAD_DISPATCH_FLOATING_TYPES(out_or_f.scalar_type(), "activation_backward_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_activation_backward_2d<scalar_t, decltype(tag)::value>(grad, saved_rows, grad_pre,
                                                                    grad_bias, params);
    });
  });
  return {grad_pre, grad_bias};
}

// --- The ops ---

at::Tensor linear_activation_cuda(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_linear_activation(input, weight, bias, activation, params);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const int64_t rows = leading_rows(input.sizes());
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  // The output in its final shape, never a view of a buffer; cuBLAS fills a 2-D view.
  at::Tensor out = at::empty(linear_output_sizes(input.sizes(), weight.size(0)), input.options());
  at::Tensor out_rows = out.view({rows, out_features});
  const at::Tensor x = input.reshape({rows, in_features});
  // f = beta + h Omega^T by cuBLAS, the bias added inside the product (one rounding, as
  // F.linear). For ReLU with a bias, cuBLASLt's RELU_BIAS epilogue applies a[.] inside the
  // product too (faster on an H100 than a pass of our own after the product: RESULTS.md;
  // it keeps NaN, as eager's ReLU does). Not without
  // in_features: _addmm_activation then returns the bias without its ReLU (torch 2.11).
  // Otherwise a[.] is applied in place by one pass over f.
  if (bias.has_value() && act == Activation::ReLU && in_features > 0) {
    at::_addmm_activation_out(out_rows, *bias, x, weight.t());
    return out;
  }
  if (bias.has_value()) {
    at::addmm_out(out_rows, *bias, x, weight.t());
  } else {
    at::mm_out(out_rows, x, weight.t());
  }
  HANDGRAD_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_activation_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_elementwise<scalar_t, decltype(tag)::value, false>(out, out, out, params);
    });
  });
  return out;
}

at::Tensor activation_cuda(const at::Tensor& input, c10::string_view activation,
                           double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_activation(input, activation, params);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor x = dense_or_contiguous(input);
  at::Tensor out = at::empty_like(x);  // x's strides: the same memory order
  HANDGRAD_DISPATCH_FLOATING_TYPES(x.scalar_type(), "activation_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_elementwise<scalar_t, decltype(tag)::value, false>(out, x, x, params);
    });
  });
  return out;
}

void activation_inplace_cuda(const at::Tensor& input, c10::string_view activation,
                             double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_activation(input, activation, params, /*inplace=*/true);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (!input.is_non_overlapping_and_dense()) {
    // A strided view: compute aside and copy back; copy_ refuses overlapping memory.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    input.copy_(activation_cuda(input, activation, negative_slope, beta, threshold));
    return;
  }
  at::Tensor data = input;
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "activation_inplace_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_elementwise<scalar_t, decltype(tag)::value, false>(data, data, data, params);
    });
  });
}

at::Tensor activation_backward_cuda(const at::Tensor& grad_output, const at::Tensor& out_or_f,
                                    c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_activation_backward(grad_output, out_or_f, activation, params);
  const c10::cuda::CUDAGuard device_guard(out_or_f.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor s = dense_or_contiguous(out_or_f);
  if (s.is_contiguous() && s.dim() >= 1 && grad_output.strides() != s.strides()) {
    // A gradient with other strides (expanded, say) is read where it lies.
    auto [grad_pre, unused] = activation_backward_matrix(grad_output, s, act, params, false);
    return grad_pre.view(s.sizes());
  }
  // dl/df in out_or_f's memory format; grad_output is copied only if its strides differ.
  const at::Tensor grad =
      grad_output.strides() == s.strides() ? grad_output : at::empty_like(s).copy_(grad_output);
  at::Tensor grad_pre = at::empty_like(s);
  HANDGRAD_DISPATCH_FLOATING_TYPES(s.scalar_type(), "activation_backward_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_elementwise<scalar_t, decltype(tag)::value, true>(grad_pre, grad, s, params);
    });
  });
  return grad_pre;
}

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& out_or_f, c10::string_view activation,
    double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act =
      check_bias_activation_backward(grad_output, out_or_f, activation, params);
  const c10::cuda::CUDAGuard device_guard(out_or_f.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [grad_pre, grad_bias] = activation_backward_matrix(grad_output, out_or_f, act, params, true);
  return {grad_pre.view(out_or_f.sizes()), grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& out_or_f, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_linear_activation_backward(grad_output, input, weight, out_or_f,
                                                          activation, params);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto [need_input, need_weight, need_bias] = output_mask;
  auto [grad_pre, grad_bias] =
      activation_backward_matrix(grad_output, out_or_f, act, params, need_bias);
  const int64_t rows = leading_rows(input.sizes());
  at::Tensor grad_input, grad_weight;
  if (need_input) grad_input = at::mm(grad_pre, weight).view(input.sizes());  // (7.6)
  if (need_weight) grad_weight = at::mm(grad_pre.t(), input.reshape({rows, weight.size(1)}));  // (7.9)
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("linear_activation", &linear_activation_cuda);
  m.impl("activation", &activation_cuda);
  m.impl("activation_", &activation_inplace_cuda);
  m.impl("activation_backward", &activation_backward_cuda);
  m.impl("bias_activation_backward", &bias_activation_backward_cuda);
  m.impl("linear_activation_backward", &linear_activation_backward_cuda);
}

}  // namespace handgrad
