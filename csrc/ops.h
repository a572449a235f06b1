// C++ callers of the handgrad ops, through PyTorch's dispatcher.
//
// The autograd and autocast kernels call the ops this way, never a backend's function
// directly, so that the dispatcher picks the CPU or CUDA kernel (or a fake kernel while
// torch.compile traces). Each caller looks its op up once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

namespace handgrad::ops {

// The op handgrad::<name> with the C++ signature Signature.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor linear_activation(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    c10::string_view activation, const ActivationParameters& params) {
  static const auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, c10::string_view,
                                           double, double, double)>("handgrad::linear_activation");
  return handle.call(input, weight, bias, activation, params.negative_slope, params.beta, params.threshold);
}

inline at::Tensor activation(const at::Tensor& input, c10::string_view activation,
                             const ActivationParameters& params) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, c10::string_view, double, double, double)>("handgrad::activation");
  return handle.call(input, activation, params.negative_slope, params.beta, params.threshold);
}

inline void activation_(const at::Tensor& input, c10::string_view activation,
                        const ActivationParameters& params) {
  static const auto handle =
      op<void(const at::Tensor&, c10::string_view, double, double, double)>("handgrad::activation_");
  handle.call(input, activation, params.negative_slope, params.beta, params.threshold);
}

inline at::Tensor activation_backward(const at::Tensor& grad_output, const at::Tensor& out_or_f,
                                      c10::string_view activation, const ActivationParameters& params) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double, double, double)>(
          "handgrad::activation_backward");
  return handle.call(grad_output, out_or_f, activation, params.negative_slope, params.beta, params.threshold);
}

inline std::tuple<at::Tensor, at::Tensor> bias_activation_backward(
    const at::Tensor& grad_output, const at::Tensor& out_or_f, c10::string_view activation,
    const ActivationParameters& params) {
  static const auto handle = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, c10::string_view, double, double, double)>(
      "handgrad::bias_activation_backward");
  return handle.call(grad_output, out_or_f, activation, params.negative_slope, params.beta, params.threshold);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& out_or_f, c10::string_view activation, const ActivationParameters& params,
    std::array<bool, 3> output_mask) {
  static const auto handle = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      c10::string_view, double, std::array<bool, 3>, double, double)>(
      "handgrad::linear_activation_backward");
  return handle.call(grad_output, input, weight, out_or_f, activation, params.negative_slope,
                     output_mask, params.beta, params.threshold);
}

inline at::Tensor mlp(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                      c10::string_view activation, const ActivationParameters& params,
                      int64_t checkpoint_every, std::optional<c10::string_view> output_activation) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, c10::string_view, double,
                    int64_t, std::optional<c10::string_view>, double, double)>("handgrad::mlp");
  return handle.call(input, weights, biases, activation, params.negative_slope, checkpoint_every,
                     output_activation, params.beta, params.threshold);
}

inline std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward(
    const at::Tensor& input, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, const ActivationParameters& params, int64_t checkpoint_every,
    std::optional<c10::string_view> output_activation) {
  static const auto handle = op<std::tuple<at::Tensor, std::vector<at::Tensor>>(
      const at::Tensor&, at::TensorList, at::TensorList, c10::string_view, double, int64_t,
      std::optional<c10::string_view>, double, double)>("handgrad::mlp_forward");
  return handle.call(input, weights, biases, activation, params.negative_slope, checkpoint_every,
                     output_activation, params.beta, params.threshold);
}

inline std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs, c10::string_view activation,
    const ActivationParameters& params, int64_t checkpoint_every, bool input_requires_grad,
    std::optional<c10::string_view> output_activation, bool parameters_require_grad = true) {
  static const auto handle =
      op<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
          const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
          c10::string_view, double, int64_t, bool, std::optional<c10::string_view>, bool, double,
          double)>("handgrad::mlp_backward");
  return handle.call(grad_output, input, weights, biases, hidden_outputs, activation,
                     params.negative_slope, checkpoint_every, input_requires_grad,
                     output_activation, parameters_require_grad, params.beta, params.threshold);
}

using SecondOrderResults =
    std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

inline SecondOrderResults mlp_double_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs,
    const std::optional<at::Tensor>& grad_grad_input,
    const c10::List<std::optional<at::Tensor>>& grad_grad_weights,
    const c10::List<std::optional<at::Tensor>>& grad_grad_biases, c10::string_view activation,
    const ActivationParameters& params, std::optional<c10::string_view> output_activation,
    std::array<bool, 4> output_mask) {
  static const auto handle = op<SecondOrderResults(
      const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
      const std::optional<at::Tensor>&, const c10::List<std::optional<at::Tensor>>&,
      const c10::List<std::optional<at::Tensor>>&, c10::string_view, double,
      std::optional<c10::string_view>, std::array<bool, 4>, double, double)>(
      "handgrad::mlp_double_backward");
  return handle.call(grad_output, input, weights, biases, hidden_outputs, grad_grad_input,
                     grad_grad_weights, grad_grad_biases, activation, params.negative_slope,
                     output_activation, output_mask, params.beta, params.threshold);
}

// f = beta + Omega h, by the fused layer with the identity for an activation (leaky_relu of
// slope 1): for the backward where a' must be read off f itself (csrc/activation.h).
inline at::Tensor preactivation(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  return linear_activation(input, weight, bias, "leaky_relu", ActivationParameters{1.0});
}

// The tensor a layer's a' is read off, recomputed from the layer's input where it was not
// stored: f where a' needs it, else the output a[f] (csrc/activation.h).
inline at::Tensor recompute_out_or_f(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, Activation activation,
                                    const ActivationParameters& params) {
  if (derivative_needs_preactivation(activation, params)) {
    return preactivation(input, weight, bias);
  }
  return linear_activation(input, weight, bias, activation_name(activation), params);
}

// The layer-by-layer network, written once: layer l's bias (none for a network without
// biases), and h_{l+1} = a[beta_l + Omega_l h_l] for the hidden layers first to last - 1,
// each h_made for which keep(made) holds appended to outputs. Through the per-layer op, so
// under grad mode each layer records its own differentiable backward.
inline std::optional<at::Tensor> bias_of(at::TensorList biases, size_t l) {
  return biases.empty() ? std::nullopt : std::optional<at::Tensor>(biases[l]);
}

template <typename Keep>
at::Tensor run_hidden(at::Tensor h, at::TensorList weights, at::TensorList biases, size_t first,
                      size_t last, c10::string_view activation, const ActivationParameters& params,
                      const Keep& keep, std::vector<at::Tensor>& outputs) {
  for (size_t l = first; l < last; ++l) {
    h = linear_activation(h, weights[l], bias_of(biases, l), activation, params);
    if (keep(l + 1)) outputs.push_back(h);
  }
  return h;
}

}  // namespace handgrad::ops
