// The CPU implementations of the handgrad ops (TORCH_LIBRARY_IMPL CPU): each checks its
// arguments (csrc/checks.h), lays out its tensors, and calls the kernels of the capability
// chosen at import (csrc/cpu/kernels.h). The fused layers and their backward are networks
// of one layer for the fused engine.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace handgrad {
namespace {

// A fused layer is a network of one layer whose output layer has the activation: the fused
// engine (csrc/cpu/kernels/fused_mlp.cpp) runs it, the bias inside the accumulation, a[.] while each
// block of rows is in cache. With the identity (ops::preactivation's f) the output layer is
// linear: no pass for a or a'.
cpu::NetworkActivations layer_activations(Activation act, const ActivationParameters& params) {
  return {act, is_identity(act, params) ? std::nullopt : std::optional<Activation>(act), params};
}

at::Tensor linear_activation_cpu(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_linear_activation(input, weight, bias, activation, params);
  const at::Tensor biases[1] = {bias.has_value() ? *bias : at::Tensor()};
  return cpu::kernels().fused_forward(input, weight, bias.has_value() ? at::TensorList(biases) : at::TensorList(),
                                      layer_activations(act, params), 0, nullptr);
}

at::Tensor activation_cpu(const at::Tensor& input, c10::string_view activation,
                          double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_activation(input, activation, params);

  const at::Tensor x = dense_or_contiguous(input);
  at::Tensor out = at::empty_like(x);  // x's strides: the same memory order
  cpu::kernels().activation(x, out, act, params);
  return out;
}

void activation_inplace_cpu(const at::Tensor& input, c10::string_view activation,
                            double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_activation(input, activation, params, /*inplace=*/true);
  if (!input.is_non_overlapping_and_dense()) {
    // A strided view: compute aside and copy back; copy_ refuses overlapping memory.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    input.copy_(activation_cpu(input, activation, negative_slope, beta, threshold));
    return;
  }
  cpu::kernels().activation(input, input, act, params);
}

at::Tensor activation_backward_cpu(const at::Tensor& grad_output, const at::Tensor& out_or_f,
                                   c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_activation_backward(grad_output, out_or_f, activation, params);

  // dl/df in out_or_f's memory format; grad_output is copied only if its strides differ.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor s = dense_or_contiguous(out_or_f);
  const at::Tensor grad =
      grad_output.strides() == s.strides() ? grad_output : at::empty_like(s).copy_(grad_output);
  at::Tensor grad_pre = at::empty_like(s);
  cpu::kernels().activation_backward(grad, s, grad_pre, act, params);
  return grad_pre;
}

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& out_or_f, c10::string_view activation,
    double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act =
      check_bias_activation_backward(grad_output, out_or_f, activation, params);

  const int64_t cols = out_or_f.size(-1);
  const at::Tensor grad = grad_output.contiguous(), saved_contiguous = out_or_f.contiguous();
  at::Tensor grad_pre = at::empty(out_or_f.sizes(), out_or_f.options());
  at::Tensor grad_bias = at::empty({cols}, out_or_f.options());
  cpu::kernels().bias_activation_backward(grad, saved_contiguous, grad_pre, grad_bias, act,
                                          params);
  return {grad_pre, grad_bias};
}

// dl/dh (7.6), dl/dOmega (7.9) and dl/dbeta of a fused layer, by the fused engine: a' read
// off out_or_f in cache, the weight gradient accumulated in a fixed order (deterministic).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& out_or_f, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const Activation act = check_linear_activation_backward(grad_output, input, weight, out_or_f,
                                                          activation, params);
  auto [grad_input, grad_weights, grad_biases] =
      cpu::kernels().fused_backward(grad_output, input, weight, {}, {}, out_or_f, layer_activations(act, params),
                                    0, output_mask);
  return {grad_input, output_mask[1] ? grad_weights[0] : at::Tensor(),
          output_mask[2] ? grad_biases[0] : at::Tensor()};
}

// --- The whole network (mlp, mlp_forward, mlp_backward): the fused engine ---

using OutputActivation = std::optional<c10::string_view>;

// The forward of mlp and mlp_forward; the latter's stored hidden outputs go to
// hidden_outputs, where given.
at::Tensor fused_network_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                                 c10::string_view activation, double negative_slope, int64_t checkpoint_every,
                                 OutputActivation output_activation, double beta, double threshold,
                                 std::vector<at::Tensor>* hidden_outputs) {
  const ActivationParameters params{negative_slope, beta, threshold};
  check_mlp(input, weights, biases, activation, params, checkpoint_every, output_activation);
  return cpu::kernels().fused_forward(input, weights, biases,
                                      cpu::network_activations(activation, params, output_activation),
                                      checkpoint_every, hidden_outputs);
}

at::Tensor mlp_cpu(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                   c10::string_view activation, double negative_slope, int64_t checkpoint_every,
                   OutputActivation output_activation, double beta, double threshold) {
  return fused_network_forward(input, weights, biases, activation, negative_slope, checkpoint_every,
                               output_activation, beta, threshold, nullptr);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_cpu(
    const at::Tensor& input, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, double negative_slope, int64_t checkpoint_every,
    OutputActivation output_activation, double beta, double threshold) {
  std::vector<at::Tensor> hidden_outputs;
  at::Tensor out = fused_network_forward(input, weights, biases, activation, negative_slope, checkpoint_every,
                                         output_activation, beta, threshold, &hidden_outputs);
  return {out, hidden_outputs};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs, c10::string_view activation,
    double negative_slope, int64_t checkpoint_every, bool input_requires_grad,
    OutputActivation output_activation, bool parameters_require_grad, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  check_mlp_backward(input, weights, biases, hidden_outputs, activation, params, checkpoint_every,
                     output_activation);
  // The engine returns no weight or bias gradients where the mask asks for none.
  return cpu::kernels().fused_backward(
      grad_output, input, weights, biases, hidden_outputs, at::Tensor(),
      cpu::network_activations(activation, params, output_activation), checkpoint_every,
      {input_requires_grad, parameters_require_grad, parameters_require_grad && !biases.empty()});
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("linear_activation", &linear_activation_cpu);
  m.impl("activation", &activation_cpu);
  m.impl("activation_", &activation_inplace_cpu);
  m.impl("activation_backward", &activation_backward_cpu);
  m.impl("bias_activation_backward", &bias_activation_backward_cpu);
  m.impl("linear_activation_backward", &linear_activation_backward_cpu);
  m.impl("mlp", &mlp_cpu);
  m.impl("mlp_forward", &mlp_forward_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
}

}  // namespace handgrad
