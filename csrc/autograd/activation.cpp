// The Autograd kernels of the standalone activations, out = a[input] and in place, and of
// the backward pieces dl/df = dl/d(out) * a' (and the bias gradient beside it), which are
// differentiable so that a recorded backward (create_graph=True) of any layer or
// activation can be differentiated again. The pattern is linear_activation.cpp's.
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../ops.h"
#include "function.h"
#include "tensor_formulas.h"

namespace handgrad {

// csrc/activation.h's mask, for the formulas on tensors (tensor_formulas.h): a bool tensor,
// which a product promotes.
at::Tensor less_than(const at::Tensor& a, double b) { return a < b; }

namespace {

using namespace handgrad::autograd;

// --- The standalone activations: out = a[input], and in place ---

// The activation's node, written as PyTorch's generated nodes are (as linear_activation.cpp's
// LinearActivationBackward0) rather than as a torch::autograd::Function: the Function's
// context took about 16 us of a 10 x 40 SiLU's forward+backward. It keeps the input where a'
// is read off f, else the output. Mirrored by autograd.py's _setup_activation (test_func.py
// checks that both keep the same).
struct ActivationBackward0 : public torch::autograd::Node {
  torch::autograd::SavedVariable out_or_f_;
  Activation activation_ = Activation::ReLU;
  ActivationParameters params_;
  bool off_output_ = false;

  std::string name() const override { return "ActivationBackward0"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    out_or_f_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return no_gradients(num_outputs());
    // Under create_graph the backward op records its own differentiable node.
    return {ops::activation_backward(grads[0], out_or_f_.unpack(getptr()), activation_name(activation_), params_)};
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(out_or_f_, off_output_);
    args.collect(static_cast<int8_t>(activation_));
    args.collect(params_.negative_slope);
    args.collect(params_.beta);
    args.collect(params_.threshold);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return apply_with_swapped(*this, grads, saved, out_or_f_);
  }
};

at::Tensor activation_autograd(const at::Tensor& input, c10::string_view activation,
                               double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&input})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::activation(input, activation, params);
  }
  refuse_tangent(has_tangent(input), "activation", "handgrad.functional's activations and the handgrad.nn ones");
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = ops::activation(input, activation, params);  // checks the arguments first
  }
  auto node = make_node<ActivationBackward0>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->activation_ = parse_activation(activation);
  node->params_ = params;
  node->off_output_ = !derivative_needs_preactivation(node->activation_, params);
  torch::autograd::set_history(out, node);
  node->out_or_f_ = torch::autograd::SavedVariable(node->off_output_ ? out : input, node->off_output_);
  return out;
}

class InplaceActivationFunction : public torch::autograd::Function<InplaceActivationFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input,
                          c10::string_view activation, const ActivationParameters& params) {
    const Activation act = parse_activation(activation);
    at::Tensor input_copy;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (derivative_needs_preactivation(act, params) && has_second_derivative(act)) {
        input_copy = input.clone();
      }
      ops::activation_(input, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, act, params);
    ctx->mark_dirty({input});  // apply() bumps its version and rebases its history
    // The output, which a' is read off; for SiLU and GELU, a copy of the input, as eager keeps.
    ctx->save_for_backward({input_copy.defined() ? input_copy : input});
    return input;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return no_gradients(3);
    const SavedActivation a = saved_activation(ctx);
    // As eager's leaky_relu_: the input is gone, and the output cannot tell the sign of f.
    TORCH_CHECK(
        !(a.activation == Activation::LeakyReLU && derivative_needs_preactivation(a.activation, a.params)),
        "leaky_relu_: the backward of the in-place leaky_relu with a negative slope (",
        a.params.negative_slope, ") is not supported, because the output no longer tells the sign "
        "of the input; use the out-of-place leaky_relu (inplace=False)");
    const Variable grad_input = ops::activation_backward(
        grad_outputs[0], ctx->get_saved_variables()[0], a.name, a.params);
    return {grad_input, Variable(), Variable()};
  }
};

void activation_inplace_autograd(const at::Tensor& input, c10::string_view activation,
                                 double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&input})) {
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      ops::activation_(input, activation, params);
    }
    input.unsafeGetTensorImpl()->bump_version();  // what ADInplaceOrView would have done
    return;
  }
  InplaceActivationFunction::apply(input, activation, params);
}

// --- The backward pieces, differentiable for double backward ---

// Gradients of grad_pre = grad_output * a'(out_or_f) with respect to grad_output and out_or_f.
// Mirrored by autograd.py's _grads_of_activation_backward, which forward-mode AD and
// torch.func use; test_func.py checks that both pieces keep the same tensors.
variable_list grads_of_activation_backward(AutogradContext* ctx, const Variable& grad_grad_pre) {
  if (!grad_grad_pre.defined()) return no_gradients(4);
  const auto saved_vars = ctx->get_saved_variables();
  const Variable &grad_output = saved_vars[0], &out_or_f = saved_vars[1];
  const SavedActivation a = saved_activation(ctx);
  Variable grad_grad_output, grad_out_or_f;
  if (ctx->needs_input_grad(0)) {
    grad_grad_output = ops::activation_backward(grad_grad_pre, out_or_f, a.name, a.params);
  }
  if (ctx->needs_input_grad(1) && has_second_derivative(a.activation)) {
    // ReLU and LeakyReLU have a'' = 0 almost everywhere: nothing flows back through out_or_f.
    grad_out_or_f = grad_grad_pre.mul(grad_output).mul(derivative_of_derivative(a.activation, out_or_f, a.params));
  }
  return {grad_grad_output, grad_out_or_f, Variable(), Variable()};
}

class ActivationBackwardFunction : public torch::autograd::Function<ActivationBackwardFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& grad_output, const Variable& out_or_f,
                          c10::string_view activation, const ActivationParameters& params) {
    at::Tensor grad_pre;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grad_pre = ops::activation_backward(grad_output, out_or_f, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, parse_activation(activation), params);
    ctx->save_for_backward({grad_output, out_or_f});
    return grad_pre;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return grads_of_activation_backward(ctx, grad_outputs[0]);
  }
};

at::Tensor activation_backward_autograd(const at::Tensor& grad_output, const at::Tensor& out_or_f,
                                        c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&grad_output, &out_or_f})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::activation_backward(grad_output, out_or_f, activation, params);
  }
  return ActivationBackwardFunction::apply(grad_output, out_or_f, activation, params);
}

class BiasActivationBackwardFunction
    : public torch::autograd::Function<BiasActivationBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad_output,
                               const Variable& out_or_f, c10::string_view activation,
                               const ActivationParameters& params) {
    at::Tensor grad_pre, grad_bias;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_pre, grad_bias) =
          ops::bias_activation_backward(grad_output, out_or_f, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, parse_activation(activation), params);
    ctx->save_for_backward({grad_output, out_or_f});
    return {grad_pre, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // grad_bias sums grad_pre over the rows, so its gradient reaches every row. Mirrored by
    // autograd.py's _BiasActivationBackward.backward.
    const Variable &grad_grad_pre = grad_outputs[0], &grad_grad_bias = grad_outputs[1];
    if (!grad_grad_bias.defined()) return grads_of_activation_backward(ctx, grad_grad_pre);
    const Variable out_or_f = ctx->get_saved_variables()[1];  // a copy: the list is a temporary
    return grads_of_activation_backward(
        ctx, grad_grad_pre.defined() ? grad_grad_pre.add(grad_grad_bias)
                                     : grad_grad_bias.expand(out_or_f.sizes()));
  }
};

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& out_or_f, c10::string_view activation,
    double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&grad_output, &out_or_f})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::bias_activation_backward(grad_output, out_or_f, activation, params);
  }
  const variable_list grads =
      BiasActivationBackwardFunction::apply(grad_output, out_or_f, activation, params);
  return {grads[0], grads[1]};
}
}  // namespace

TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("activation", &activation_autograd);
  m.impl("activation_", &activation_inplace_autograd);
  m.impl("activation_backward", &activation_backward_autograd);
  m.impl("bias_activation_backward", &bias_activation_backward_autograd);
}

}  // namespace handgrad
