// The CPU kernels, chosen at run time for the CPU they run on.
//
// csrc/cpu/kernels/ is compiled once per capability (DEFAULT, and AVX2 and AVX512 on
// x86-64), each into a library of its own, handgrad/_cpu_<CAPABILITY>.so, with that
// capability's compiler flags and hidden symbols, and its code in the namespace
// handgrad::cpu::<CAPABILITY> (as at::vec's CPU_CAPABILITY namespace): no inline function
// or template instance compiled for one capability can be linked into another's path.
// Each library offers one table of entry points. handgrad's import chooses a capability
// (torch.backends.cpu.get_cpu_capability(), lowered by HANDGRAD_CPU_CAPABILITY) and hands
// its library to load_kernels; the ops in handgrad._C (csrc/cpu/ops.cpp, csrc/autograd/mlp.cpp) call
// kernels(). This is ATen's scheme (aten/src/ATen/native/cpu/README.md) with libraries for
// files, since an extension's build gives one set of flags per library.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace handgrad::cpu {

// The activations of a network: `hidden` after every hidden layer, `output` (if any) after
// the output layer; their parameters.
struct NetworkActivations {
  Activation hidden;
  std::optional<Activation> output;
  ActivationParameters params;
};

// A network's activations from the ops' arguments (names parsed, as checked before).
inline NetworkActivations network_activations(c10::string_view activation, const ActivationParameters& params,
                                              std::optional<c10::string_view> output_activation) {
  std::optional<Activation> output;
  if (output_activation.has_value()) output = parse_activation(*output_activation);
  return {parse_activation(activation), output, params};
}

using NetworkGradients = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The double backward's gradients: of the first backward's dl/d(out), of the input, and of
// the weights and biases (empty where not asked).
struct SecondOrderGradients {
  at::Tensor grad_output, input;
  std::vector<at::Tensor> weights, biases;
};

// Which pass runs a network's forward: the engine's blocks of rows, the engine's pass over
// few rows as f^T = Omega h^T (csrc/cpu/kernels/fused_mlp.cpp), or BLAS's products layer by
// layer (csrc/cpu/kernels/blas_network.cpp).
enum class ForwardPath { Blocks, Transposed, Blas };

// Bumped whenever this table changes, so that a library left from another build is refused.
constexpr int kKernelsVersion = 6;

struct Kernels {
  int version;             // kKernelsVersion of the sources it was built from
  const char* capability;  // "DEFAULT", "AVX2" or "AVX512"
  const char* micro_kernel;

  // The fused engine (csrc/cpu/kernels/fused_mlp.cpp): out = the network applied to input
  // (*, d_0). biases is empty, or one per layer. With `hidden_outputs` non-null, the hidden
  // outputs the backward needs are stored there as (rows, d) matrices: every one, or with
  // checkpoint_every = k > 0 every k-th below the last.
  at::Tensor (*fused_forward)(const at::Tensor& input, at::TensorList weights,
                              at::TensorList biases, const NetworkActivations& activations,
                              int64_t checkpoint_every, std::vector<at::Tensor>* hidden_outputs);
  // The gradients of the network's input, weights and biases, given dl/d(out), for those
  // `output_mask` asks. `hidden_outputs` is what fused_forward stored. out_or_f, if
  // defined, gives the output layer's a' (the activation's output, or f where it hides the
  // sign); otherwise f of the output layer is recomputed in cache.
  NetworkGradients (*fused_backward)(const at::Tensor& grad_output, const at::Tensor& input,
                                     at::TensorList weights, at::TensorList biases,
                                     at::TensorList hidden_outputs, const at::Tensor& out_or_f,
                                     const NetworkActivations& activations,
                                     int64_t checkpoint_every, std::array<bool, 3> output_mask);

  // The derivative of fused_backward, given the cotangents of its results (v of dl/dh_0,
  // V_l of dl/dOmega_l, u_l of dl/dbeta_l; each may be absent), in blocks of rows
  // (csrc/cpu/kernels/fused_second_order.cpp). hidden_outputs holds every hidden output.
  // output_mask asks for the gradients of grad_output, input, weights and biases.
  SecondOrderGradients (*fused_double_backward)(
      const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
      at::TensorList biases, at::TensorList hidden_outputs, const std::optional<at::Tensor>& v,
      const std::vector<std::optional<at::Tensor>>& V, const std::vector<std::optional<at::Tensor>>& u,
      const NetworkActivations& activations, std::array<bool, 4> output_mask);

  // Which pass runs this network's forward (blas_network.h says where, as measured).
  // output_layer_source: the backward is given the output layer's out_or_f.
  ForwardPath (*forward_path)(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                              int64_t checkpoint_every, bool output_layer_source);
  // Whether the engine gives this network's backward to BLAS, layer by layer over all rows,
  // rather than run it in blocks: it keeps few rows (blas_network.h).
  bool (*blas_backward_pays)(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                             int64_t checkpoint_every, bool output_layer_source);

  // Whether this network's recorded graph is a chain of fused layers, each keeping its f,
  // rather than one node (blas_network.h says where, as measured).
  bool (*runs_as_layers)(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                         int64_t checkpoint_every);

  // Whether the double backward of this network is faster as the tensor formula on BLAS's
  // products than as fused_double_backward (blas_network.cpp says where, as measured).
  bool (*second_order_blas_pays)(int64_t rows, at::TensorList weights);

  // Elementwise (csrc/cpu/kernels/elementwise.cpp), over the memory of tensors that are
  // non-overlapping and dense in the same order: out = a[input] (out may be input), and
  // grad_pre = grad * a'[.].
  void (*activation)(const at::Tensor& input, const at::Tensor& out, Activation activation,
                     const ActivationParameters& params);
  void (*activation_backward)(const at::Tensor& grad, const at::Tensor& out_or_f,
                              const at::Tensor& grad_pre, Activation activation,
                              const ActivationParameters& params);
  // Contiguous (rows, cols): grad_pre = grad * a'[.] and grad_bias = its column sums.
  void (*bias_activation_backward)(const at::Tensor& grad, const at::Tensor& out_or_f,
                                   const at::Tensor& grad_pre, const at::Tensor& grad_bias,
                                   Activation activation, const ActivationParameters& params);
};

// The kernels that run (csrc/cpu/load_kernels.cpp).
const Kernels& kernels();

// Loads the capability library at `path` and makes its kernels the ones that run; returns
// its capability. Called by handgrad's import, and again by tests to try every capability.
std::string load_kernels(const std::string& path);

}  // namespace handgrad::cpu
