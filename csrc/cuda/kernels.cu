// CUDA implementations of the handgrad ops.
//
// The matrix products go through cuBLAS via ATen (at::mm). The rest is hand-written here
// and runs the formulas of csrc/activation.h, the same ones the CPU kernels use: the bias +
// activation epilogue, the pass that makes dl/df and the bias gradient together, and the
// standalone activations. Half types are computed in float (at::opmath_type).
//
// Every kernel is launched on the current stream with no host synchronisation, so a
// forward+backward can be captured in a CUDA graph; every launch is checked. The bias
// gradient is reduced in two passes over a fixed partition of the rows, without atomics, so
// it is the same bit for bit on every run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../checks.h"

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
  return std::max<int64_t>(1, std::min<int64_t>((work_items + kThreads - 1) / kThreads, 1 << 20));
}

#define HANDGRAD_DISPATCH_CUDA_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// out[i, j] = a[out[i, j] + bias[j]] over a contiguous (rows, cols) matrix, PACK elements
// per thread step; PACK > 1 only when cols is a multiple of it and the data is aligned,
// so a pack never straddles two rows.
template <typename scalar_t, Activation A, int PACK>
__global__ void bias_activation_kernel(scalar_t* out, const scalar_t* bias, int64_t packs,
                                       int64_t packs_per_row, at::opmath_type<scalar_t> slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, PACK>;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    PackT f = reinterpret_cast<PackT*>(out)[p];
    PackT b;
    if (bias != nullptr) b = reinterpret_cast<const PackT*>(bias)[p % packs_per_row];
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      const opmath_t beta = bias != nullptr ? static_cast<opmath_t>(b.value[k]) : opmath_t(0);
      f.value[k] = static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(f.value[k]) + beta, slope));
    }
    reinterpret_cast<PackT*>(out)[p] = f;
  }
}

// out = a[input] (BACKWARD false) or out = grad * a'(saved) (BACKWARD true), elementwise over
// contiguous memory: packs of PACK elements, then a scalar tail.
template <typename scalar_t, Activation A, bool BACKWARD, int PACK>
__global__ void elementwise_kernel(scalar_t* out, const scalar_t* first, const scalar_t* second,
                                   int64_t numel, at::opmath_type<scalar_t> slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, PACK>;
  const auto apply = [&](scalar_t x, scalar_t y) {
    if constexpr (BACKWARD) {
      return static_cast<scalar_t>(
          activation_backward<A>(static_cast<opmath_t>(x), static_cast<opmath_t>(y), slope));
    } else {
      return static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(x), slope));
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

// Pass 1 of the backward: grad_pre = grad * a'(saved) over a (rows, cols) matrix, and the
// column sums of each chunk of rows_per_chunk rows into partial[chunk, :] (opmath).
// Block (32, 8): x walks the columns, PACK at a time; y walks the chunk's rows.
constexpr int kColumnThreads = 32, kRowThreads = 8;

template <typename scalar_t, Activation A, int PACK>
__global__ void bias_activation_backward_kernel(
    const scalar_t* grad, const scalar_t* saved, scalar_t* grad_pre,
    at::opmath_type<scalar_t>* partial, int64_t rows, int64_t cols, int64_t rows_per_chunk,
    at::opmath_type<scalar_t> slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, PACK>;
  __shared__ opmath_t sums[kRowThreads][kColumnThreads * PACK + 1];
  const int64_t col = (blockIdx.x * static_cast<int64_t>(kColumnThreads) + threadIdx.x) * PACK;
  const int64_t chunk = blockIdx.y;
  const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
  opmath_t acc[PACK];
#pragma unroll
  for (int k = 0; k < PACK; ++k) acc[k] = opmath_t(0);
  if (col < cols) {
    for (int64_t row = chunk * rows_per_chunk + threadIdx.y; row < row_end; row += kRowThreads) {
      const int64_t i = row * cols + col;
      const PackT g = *reinterpret_cast<const PackT*>(grad + i);
      const PackT s = *reinterpret_cast<const PackT*>(saved + i);
      PackT d;
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        const opmath_t value = activation_backward<A>(static_cast<opmath_t>(g.value[k]),
                                                      static_cast<opmath_t>(s.value[k]), slope);
        d.value[k] = static_cast<scalar_t>(value);
        acc[k] += value;
      }
      *reinterpret_cast<PackT*>(grad_pre + i) = d;
    }
  }
#pragma unroll
  for (int k = 0; k < PACK; ++k) sums[threadIdx.y][threadIdx.x * PACK + k] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      opmath_t total = opmath_t(0);
      for (int y = 0; y < kRowThreads; ++y) total += sums[y][threadIdx.x * PACK + k];  // fixed order
      partial[chunk * cols + col + k] = total;
    }
  }
}

// Pass 2: grad_bias[j] = sum over chunks of partial[chunk, j], in chunk order.
template <typename scalar_t>
__global__ void sum_chunks_kernel(const at::opmath_type<scalar_t>* partial, scalar_t* grad_bias,
                                  int64_t chunks, int64_t cols) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  at::opmath_type<scalar_t> total = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[chunk * cols + col];
  grad_bias[col] = static_cast<scalar_t>(total);
}

// --- Launchers ---

template <typename scalar_t, Activation A>
void launch_bias_activation(at::Tensor& out, const at::Tensor& bias, double negative_slope) {
  const int64_t cols = out.size(1), numel = out.numel();
  if (numel == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  scalar_t* data = out.mutable_data_ptr<scalar_t>();
  const scalar_t* bias_data = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const auto slope = static_cast<at::opmath_type<scalar_t>>(negative_slope);
  constexpr int P = kPack<scalar_t>;
  if (cols % P == 0 && aligned(data) && (bias_data == nullptr || aligned(bias_data))) {
    bias_activation_kernel<scalar_t, A, P><<<blocks_for(numel / P), kThreads, 0, stream>>>(
        data, bias_data, numel / P, cols / P, slope);
  } else {
    bias_activation_kernel<scalar_t, A, 1><<<blocks_for(numel), kThreads, 0, stream>>>(
        data, bias_data, numel, cols, slope);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Activation A, bool BACKWARD>
void launch_elementwise(at::Tensor& out, const at::Tensor& first, const at::Tensor& second,
                        double negative_slope) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const scalar_t* first_data = first.const_data_ptr<scalar_t>();
  const scalar_t* second_data = BACKWARD ? second.const_data_ptr<scalar_t>() : nullptr;
  const auto slope = static_cast<at::opmath_type<scalar_t>>(negative_slope);
  constexpr int P = kPack<scalar_t>;
  if (aligned(out_data) && aligned(first_data) && (!BACKWARD || aligned(second_data))) {
    elementwise_kernel<scalar_t, A, BACKWARD, P><<<blocks_for(numel / P + 1), kThreads, 0, stream>>>(
        out_data, first_data, second_data, numel, slope);
  } else {
    elementwise_kernel<scalar_t, A, BACKWARD, 1><<<blocks_for(numel), kThreads, 0, stream>>>(
        out_data, first_data, second_data, numel, slope);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Activation A>
void launch_bias_activation_backward(const at::Tensor& grad, const at::Tensor& saved,
                                     at::Tensor& grad_pre, at::Tensor& grad_bias,
                                     double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = grad.size(0), cols = grad.size(1);
  if (cols == 0) return;
  if (rows == 0) {
    grad_bias.zero_();
    return;
  }
  // The partition depends on the shape alone: the same sums in the same order every run.
  constexpr int64_t kMaxChunks = 1024;
  const int64_t rows_per_chunk =
      std::max<int64_t>(kRowThreads, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partial = at::empty({chunks, cols}, grad.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto slope = static_cast<opmath_t>(negative_slope);
  const dim3 block(kColumnThreads, kRowThreads);
  constexpr int P = kPack<scalar_t>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* s = saved.const_data_ptr<scalar_t>();
  scalar_t* d = grad_pre.mutable_data_ptr<scalar_t>();
  if (cols % P == 0 && aligned(g) && aligned(s) && aligned(d)) {
    const dim3 grid((cols / P + kColumnThreads - 1) / kColumnThreads, chunks);
    bias_activation_backward_kernel<scalar_t, A, P><<<grid, block, 0, stream>>>(
        g, s, d, partial.mutable_data_ptr<opmath_t>(), rows, cols, rows_per_chunk, slope);
  } else {
    const dim3 grid((cols + kColumnThreads - 1) / kColumnThreads, chunks);
    bias_activation_backward_kernel<scalar_t, A, 1><<<grid, block, 0, stream>>>(
        g, s, d, partial.mutable_data_ptr<opmath_t>(), rows, cols, rows_per_chunk, slope);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_chunks_kernel<scalar_t><<<blocks_for(cols), kThreads, 0, stream>>>(
      partial.const_data_ptr<opmath_t>(), grad_bias.mutable_data_ptr<scalar_t>(), chunks, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- The ops ---

at::Tensor linear_activation_cuda(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  c10::string_view activation, double negative_slope) {
  const Activation act = parse_activation(activation);
  check_linear_arguments(op_name(activation, true), input, weight, bias, negative_slope,
                         /*half_supported=*/true);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const int64_t rows = leading_rows(input);
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  // f = h Omega^T by cuBLAS; beta and a[.] by one pass over it.
  at::Tensor out = at::mm(input.reshape({rows, in_features}), weight.t()).contiguous();
  const at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();
  HANDGRAD_DISPATCH_CUDA_TYPES(out.scalar_type(), "linear_activation_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_bias_activation<scalar_t, decltype(tag)::value>(out, bias_contiguous, negative_slope);
    });
  });
  return out.view(linear_output_sizes(input, weight));
}

at::Tensor activation_cuda(const at::Tensor& input, c10::string_view activation,
                           double negative_slope) {
  const Activation act = parse_activation(activation);
  check_activation_arguments(op_name(activation, false), input, negative_slope, true);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor input_contiguous = input.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  HANDGRAD_DISPATCH_CUDA_TYPES(input.scalar_type(), "activation_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_elementwise<scalar_t, decltype(tag)::value, false>(out, input_contiguous,
                                                                input_contiguous, negative_slope);
    });
  });
  return out;
}

at::Tensor activation_backward_cuda(const at::Tensor& grad_output, const at::Tensor& saved,
                                    c10::string_view activation, double negative_slope) {
  const Activation act = parse_activation(activation);
  check_backward_arguments(op_name(activation, false) + "_backward", grad_output, saved,
                           negative_slope, true);
  const c10::cuda::CUDAGuard device_guard(saved.device());
  const at::Tensor grad = grad_output.contiguous(), saved_contiguous = saved.contiguous();
  at::Tensor grad_pre = at::empty(saved.sizes(), saved.options());
  HANDGRAD_DISPATCH_CUDA_TYPES(saved.scalar_type(), "activation_backward_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_elementwise<scalar_t, decltype(tag)::value, true>(grad_pre, grad, saved_contiguous,
                                                               negative_slope);
    });
  });
  return grad_pre;
}

// grad_pre and grad_bias of a (rows, cols) view of grad_output and saved.
std::tuple<at::Tensor, at::Tensor> bias_activation_backward_matrix(
    const at::Tensor& grad_output, const at::Tensor& saved, Activation act, double negative_slope) {
  const int64_t rows = leading_rows(saved), cols = saved.size(-1);
  const at::Tensor grad = grad_output.reshape({rows, cols}).contiguous();
  const at::Tensor saved_rows = saved.reshape({rows, cols}).contiguous();
  at::Tensor grad_pre = at::empty({rows, cols}, saved.options());
  at::Tensor grad_bias = at::empty({cols}, saved.options());
  HANDGRAD_DISPATCH_CUDA_TYPES(saved.scalar_type(), "bias_activation_backward_cuda", [&] {
    dispatch_activation(act, [&](auto tag) {
      launch_bias_activation_backward<scalar_t, decltype(tag)::value>(
          grad, saved_rows, grad_pre, grad_bias, negative_slope);
    });
  });
  return {grad_pre, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& saved, c10::string_view activation,
    double negative_slope) {
  const Activation act = parse_activation(activation);
  const std::string op = op_name(activation, true) + "_backward";
  check_bias_backward_arguments(op, grad_output, saved, negative_slope, true);
  const c10::cuda::CUDAGuard device_guard(saved.device());
  auto [grad_pre, grad_bias] = bias_activation_backward_matrix(grad_output, saved, act, negative_slope);
  return {grad_pre.view(saved.sizes()), grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  const std::string op = op_name(activation, true) + "_backward";
  check_linear_backward_arguments(op, grad_output, input, weight, saved, negative_slope, true);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto [need_input, need_weight, need_bias] = output_mask;
  auto [grad_pre, grad_bias] = bias_activation_backward_matrix(grad_output, saved, act, negative_slope);
  const int64_t rows = leading_rows(input);
  at::Tensor grad_input, grad_weight;
  if (need_input) grad_input = at::mm(grad_pre, weight).view(input.sizes());  // (7.6)
  if (need_weight) grad_weight = at::mm(grad_pre.t(), input.reshape({rows, weight.size(1)}));  // (7.9)
  return {grad_input, grad_weight, need_bias ? grad_bias : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("linear_activation", &linear_activation_cuda);
  m.impl("activation", &activation_cuda);
  m.impl("activation_backward", &activation_backward_cuda);
  m.impl("bias_activation_backward", &bias_activation_backward_cuda);
  m.impl("linear_activation_backward", &linear_activation_backward_cuda);
}

}  // namespace handgrad
