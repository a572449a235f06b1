// The Autocast kernels of the fused layers and networks.
//
// Inside an autocast region they run in the autocast dtype, as autocast runs nn.Linear
// (float64 and non-floating tensors stay as they are). The casts are ordinary
// differentiable ops, so gradients reach the original tensors in their own dtype. The
// standalone activations are left alone, as torch's are.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>

#include "ops.h"

namespace handgrad {
namespace {

template <c10::DeviceType device>
at::Tensor linear_activation_autocast(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return ops::linear_activation(at::autocast::cached_cast(dtype, input, device),
                                at::autocast::cached_cast(dtype, weight, device),
                                at::autocast::cached_cast(dtype, bias, device), activation,
                                params);
}

template <c10::DeviceType device>
at::Tensor mlp_autocast(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                        c10::string_view activation, double negative_slope,
                        int64_t checkpoint_every, std::optional<c10::string_view> output_activation, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return ops::mlp(at::autocast::cached_cast(dtype, input, device),
                  at::autocast::cached_cast(dtype, weights, device),
                  at::autocast::cached_cast(dtype, biases, device), activation, params,
                  checkpoint_every, output_activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, AutocastCPU, m) {
  m.impl("linear_activation", &linear_activation_autocast<c10::DeviceType::CPU>);
  m.impl("mlp", &mlp_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(handgrad, AutocastCUDA, m) {
  m.impl("linear_activation", &linear_activation_autocast<c10::DeviceType::CUDA>);
  m.impl("mlp", &mlp_autocast<c10::DeviceType::CUDA>);
}

}  // namespace handgrad
