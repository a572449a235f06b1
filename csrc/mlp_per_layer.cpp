// The whole network as one op: the backpropagation algorithm of section 7.4.
//
//   forward:  h_0 = input;  h_{l+1} = a[beta_l + Omega_l h_l] for the hidden layers;
//             out = beta_L + Omega_L h_L, or a_out[...] with an output activation.
//   backward: from the output layer down, with g = dl/df_l:
//             dl/dOmega_l = g h_l^T (7.9),  dl/dbeta_l = sum of g over the batch,
//             dl/dh_l = Omega_l^T g (7.6),  and below a hidden layer g = dl/dh_l * a'[f]
//             with a' read off the stored h_{l+1} (7.7, 7.10).
//
// This file is the network on devices other than the CPU (whose fused engine,
// csrc/cpu/kernels/fused_mlp.cpp, csrc/cpu/ops.cpp calls): each layer is one of the per-layer
// ops (linear_activation and its fused backward), called through the dispatcher below
// autograd, so each device's own kernels do the work.
//
// Gradient checkpointing (problem 7.11): with checkpoint_every = k, the forward stores the
// output of every k-th hidden layer only; the backward recomputes one stretch of k layers
// at a time from its stored input, then backpropagates through it.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checkpoint.h"
#include "checks.h"
#include "ops.h"

namespace handgrad {
namespace {

using OutputActivation = std::optional<c10::string_view>;

// The output, (rows, out_features), in the input's leading shape.
at::Tensor output_shaped(const at::Tensor& out, const at::Tensor& input) {
  if (input.dim() == 2) return out;
  at::DimVector sizes(input.sizes());
  sizes.back() = out.size(-1);
  return out.view(sizes);  // below autograd: not a view to autograd
}

using ops::bias_of;
using ops::run_hidden;

// The output layer: linear, or with its own activation.
at::Tensor output_layer(const at::Tensor& h, at::TensorList weights, at::TensorList biases,
                        const ActivationParameters& params, OutputActivation output_activation) {
  const size_t l = weights.size() - 1;
  if (output_activation.has_value()) {
    return ops::linear_activation(h, weights[l], bias_of(biases, l), *output_activation,
                                  params);
  }
  return at::linear(h, weights[l], bias_of(biases, l));
}

// The forward of mlp and mlp_forward. The latter's stored hidden outputs (h_1 ... h_L, or
// with checkpointing h_k, h_2k, ... < h_L) go to hidden_outputs, where given; otherwise
// nothing is kept, and each layer's output is freed once the next has used it.
at::Tensor network_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                           c10::string_view activation, double negative_slope, int64_t checkpoint_every,
                           OutputActivation output_activation, double beta, double threshold,
                           std::vector<at::Tensor>* hidden_outputs) {
  const ActivationParameters params{negative_slope, beta, threshold};
  check_mlp(input, weights, biases, activation, params, checkpoint_every, output_activation);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const size_t hidden = weights.size() - 1;
  std::vector<at::Tensor> none;
  const at::Tensor h = run_hidden(
      as_matrix(input), weights, biases, 0, hidden, activation, params,
      [&](size_t made) { return hidden_outputs != nullptr && is_stored_output(made, hidden, checkpoint_every); },
      hidden_outputs != nullptr ? *hidden_outputs : none);
  return output_shaped(output_layer(h, weights, biases, params, output_activation), input);
}

at::Tensor mlp_per_layer(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                         c10::string_view activation, double negative_slope,
                         int64_t checkpoint_every, OutputActivation output_activation, double beta, double threshold) {
  return network_forward(input, weights, biases, activation, negative_slope, checkpoint_every,
                         output_activation, beta, threshold, nullptr);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_per_layer(
    const at::Tensor& input, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, double negative_slope, int64_t checkpoint_every,
    OutputActivation output_activation, double beta, double threshold) {
  std::vector<at::Tensor> hidden_outputs;
  at::Tensor out = network_forward(input, weights, biases, activation, negative_slope, checkpoint_every,
                                   output_activation, beta, threshold, &hidden_outputs);
  return {out, hidden_outputs};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward_per_layer(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs, c10::string_view activation,
    double negative_slope, int64_t checkpoint_every, bool input_requires_grad,
    OutputActivation output_activation, bool parameters_require_grad, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_mlp_backward(input, weights, biases, hidden_outputs, activation,
                                            params, checkpoint_every, output_activation);
  const size_t layers = weights.size(), hidden = layers - 1;
  const Stretches stretches(hidden, checkpoint_every);
  const bool has_bias = !biases.empty();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the recomputation is not recorded

  const at::Tensor x = as_matrix(input);
  std::vector<at::Tensor> grad_weights(layers), grad_biases(has_bias ? layers : 0);
  // g = dl/d(out) of the output layer, as a (rows, out_features) matrix.
  at::Tensor g = grad_output.reshape({x.size(0), weights[hidden].size(0)});
  // The output layer from its input h_L: through its activation's fused backward (a' off f,
  // recomputed), or linear: dl/dOmega_L = g h_L^T (7.9), dl/dbeta_L = sum g, and g becomes
  // dl/dh_L = Omega_L^T g (7.6) where it is wanted.
  const auto output_layer_backward = [&](const at::Tensor& h_last, bool need_input) {
    if (output_activation.has_value()) {
      const at::Tensor out_or_f = ops::recompute_out_or_f(h_last, weights[hidden], bias_of(biases, hidden),
                                                       parse_activation(*output_activation), params);
      at::Tensor grad_h, grad_bias;
      std::tie(grad_h, grad_weights[hidden], grad_bias) = ops::linear_activation_backward(
          g, h_last, weights[hidden], out_or_f, *output_activation, params,
          {need_input, parameters_require_grad, parameters_require_grad && has_bias});
      if (has_bias) grad_biases[hidden] = grad_bias;
      g = grad_h;
      return;
    }
    if (parameters_require_grad) {
      grad_weights[hidden] = at::mm(g.t(), h_last);
      if (has_bias) grad_biases[hidden] = at::sum(g, 0);
    }
    g = need_input ? at::mm(g, weights[hidden]) : at::Tensor();
  };
  // The stretches of hidden layers, last first; without checkpointing, one stretch of all.
  for (size_t s = stretches.count; s-- > 0;) {
    const size_t first = stretches.first(s), last = stretches.last(s);
    const at::Tensor stretch_input = first == 0 ? x : hidden_outputs[s - 1];
    std::vector<at::Tensor> outputs;  // h_{first+1} ... h_last
    if (checkpoint_every > 0) {
      run_hidden(stretch_input, weights, biases, first, last, activation, params,
                 [](size_t) { return true; }, outputs);
    } else {
      outputs.assign(hidden_outputs.begin() + first, hidden_outputs.begin() + last);
    }
    if (last == hidden) output_layer_backward(outputs.back(), /*need_input=*/true);
    for (size_t l = last; l-- > first;) {
      // Hidden layer l: h_{l+1} = a[f], f = beta_l + Omega_l h_l. Its fused backward makes
      // dl/df = dl/dh_{l+1} * a' (read off h_{l+1}, or off f recomputed where h_{l+1} hides
      // its sign), dl/dbeta_l, dl/dOmega_l (7.9) and dl/dh_l (7.6).
      const at::Tensor& h = l == first ? stretch_input : outputs[l - first - 1];
      const at::Tensor out_or_f = derivative_needs_preactivation(act, params)
          ? ops::preactivation(h, weights[l], bias_of(biases, l))
          : outputs[l - first];
      const bool need_input = l > 0 || input_requires_grad;
      at::Tensor grad_h, grad_bias;
      std::tie(grad_h, grad_weights[l], grad_bias) = ops::linear_activation_backward(
          g, h, weights[l], out_or_f, activation, params,
          {need_input, parameters_require_grad, parameters_require_grad && has_bias});
      if (has_bias) grad_biases[l] = grad_bias;
      g = grad_h;
    }
  }
  if (hidden == 0) output_layer_backward(x, input_requires_grad);  // a single layer
  at::Tensor grad_input = input_requires_grad ? g.reshape(input.sizes()) : at::Tensor();
  if (!parameters_require_grad) return {grad_input, {}, {}};
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("mlp", &mlp_per_layer);
  m.impl("mlp_forward", &mlp_forward_per_layer);
  m.impl("mlp_backward", &mlp_backward_per_layer);
}

}  // namespace handgrad
