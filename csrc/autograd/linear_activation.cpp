// The Autograd kernels of the fused layer, out = a[beta + Omega h], and of its fused backward
// op: torch::autograd::Functions, as torchvision's csrc/ops/autograd are. What every
// Autograd kernel shares is in function.h; the activations' own are in activation.cpp, the
// whole network's in mlp.cpp.
//
// The forward runs the op below autograd and saves what the chapter's backward needs: h,
// Omega and out, never f (except where out hides its sign). A plain backward (grad mode
// off) runs the whole of it as one fused op; a recorded one (create_graph=True) is built
// from the differentiable backward pieces (activation.cpp), so double backward works.
//
// The C++ Function API has no forward-mode AD and no torch.func support: handgrad.functional
// sends those calls to the Python Functions of handgrad.autograd instead, which keep the
// same tensors (test_func.py checks that the two agree on what they save).
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../ops.h"
#include "function.h"

namespace handgrad {
namespace {

using namespace handgrad::autograd;

// --- The fused layer: out = a[beta + Omega h] ---

class LinearActivationFunction : public torch::autograd::Function<LinearActivationFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input, const Variable& weight,
                          const std::optional<Variable>& bias, c10::string_view activation,
                          const ActivationParameters& params) {
    const Activation act = parse_activation(activation);
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = ops::linear_activation(input, weight, bias, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, act, params);
    // Without a bias the Function has no input edge for it, so needs_input_grad(2) is not
    // to be asked.
    ctx->saved_data["has_bias"] = defined(bias);
    // a' is read off out, or off f recomputed from the input, weight and bias (which is kept
    // only then). out is kept only where it is read, so that an in-place edit of it is
    // refused exactly where eager's would be (eager's SiLU keeps its input, ReLU its output).
    // autograd.py's _setup_linear keeps the same.
    const bool reads_f = derivative_needs_preactivation(act, params);
    ctx->save_for_backward({input, weight, defined(bias) && reads_f ? *bias : Variable(), reads_f ? Variable() : out});
    return out;
  }

  // Mirrored by autograd.py's _LinearActivationFunction.backward, which forward-mode AD and
  // torch.func use.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return no_gradients(5);
    const auto saved_vars = ctx->get_saved_variables();
    const Variable &input = saved_vars[0], &weight = saved_vars[1], &bias = saved_vars[2],
                   &out = saved_vars[3];
    const auto [act, activation, params] = saved_activation(ctx);
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const Variable& grad_output = grad_outputs[0];

    // a' is read off out, or off f recomputed where it must be: with its history where a
    // recorded backward differentiates a' in turn (SiLU, GELU), else below autograd.
    Variable out_or_f = out;
    if (derivative_needs_preactivation(act, params)) {
      std::optional<c10::NoGradGuard> no_grad;
      if (!has_second_derivative(act)) no_grad.emplace();
      out_or_f = ops::preactivation(input, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
    }
    Variable grad_input, grad_weight, grad_bias;
    if (!c10::GradMode::is_enabled()) {
      // A plain backward: the whole of it in one fused op.
      std::tie(grad_input, grad_weight, grad_bias) = ops::linear_activation_backward(
          grad_output, input, weight, out_or_f, activation, params,
          {need_input, need_weight, need_bias});
    } else {
      // create_graph: differentiable pieces, each with its own autograd.
      Variable grad_pre;
      if (need_bias) {
        std::tie(grad_pre, grad_bias) =
            ops::bias_activation_backward(grad_output, out_or_f, activation, params);
      } else {
        grad_pre = ops::activation_backward(grad_output, out_or_f, activation, params);
      }
      if (need_input) grad_input = grad_pre.matmul(weight);  // dl/dh = Omega^T dl/df (7.6)
      if (need_weight) grad_weight = as_matrix(grad_pre).t().mm(as_matrix(input));  // (7.9)
    }
    return {grad_input, grad_weight, grad_bias, Variable(), Variable()};
  }
};

at::Tensor linear_activation_autograd(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const at::Tensor& bias_or_undefined = defined(bias) ? *bias : at::Tensor();
  if (!needs_function({&input, &weight, &bias_or_undefined})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::linear_activation(input, weight, bias, activation, params);
  }
  return LinearActivationFunction::apply(input, weight, bias, activation, params);
}

// The fused backward op is used only where the backward is not itself recorded, so it has
// no derivative: a call that autograd would record is refused at once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& out_or_f, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  TORCH_CHECK(
      !needs_function({&grad_output, &input, &weight, &out_or_f}),
      "linear_", activation, "_backward: this fused backward is not differentiable and not for "
      "forward-mode AD; call it under torch.no_grad(), or differentiate linear_activation's "
      "backward with create_graph=True, which uses the differentiable backward ops");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return ops::linear_activation_backward(grad_output, input, weight, out_or_f, activation,
                                         params, output_mask);
}
}  // namespace

TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("linear_activation", &linear_activation_autograd);
  m.impl("linear_activation_backward", &linear_activation_backward_autograd);
}

}  // namespace handgrad
