// The entry points of one capability's CPU kernels (named *_kernel where the formula of
// csrc/activation.h has the plain name), which table.cpp gathers into the
// Kernels table (csrc/cpu/kernels.h says what each does). Everything compiled in this
// folder lives in handgrad::cpu::CPU_CAPABILITY, the capability being a compiler flag.
#pragma once

#include "../kernels.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/ is compiled once per capability, with -DCPU_CAPABILITY=<name>"
#endif

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

at::Tensor fused_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                         const NetworkActivations& activations, int64_t checkpoint_every,
                         std::vector<at::Tensor>* hidden_outputs);

NetworkGradients fused_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                at::TensorList weights, at::TensorList biases,
                                at::TensorList hidden_outputs, const at::Tensor& out_or_f,
                                const NetworkActivations& activations, int64_t checkpoint_every,
                                std::array<bool, 3> output_mask);

SecondOrderGradients fused_double_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs, const std::optional<at::Tensor>& v,
    const std::vector<std::optional<at::Tensor>>& V, const std::vector<std::optional<at::Tensor>>& u,
    const NetworkActivations& activations, std::array<bool, 4> output_mask);

void activation_kernel(const at::Tensor& input, const at::Tensor& out, Activation activation,
                const ActivationParameters& params);

void activation_backward_kernel(const at::Tensor& grad, const at::Tensor& out_or_f,
                         const at::Tensor& grad_pre, Activation activation, const ActivationParameters& params);

void bias_activation_backward_kernel(const at::Tensor& grad, const at::Tensor& out_or_f,
                              const at::Tensor& grad_pre, const at::Tensor& grad_bias,
                              Activation activation, const ActivationParameters& params);

// What the micro-kernel holds in registers, for handgrad.build_info() (gemm.h).
const char* micro_kernel_description();

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
